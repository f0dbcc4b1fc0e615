"""Runtime ops: attention that reads and extends the runtime-owned KV cache.

The IR declares ``tokenpass::cached_attention(q, k_new, v_new, scale, layer)``; this is its
implementation. It stages the step's new keys/values into
layer ``layer`` of the active cache and attends over every live slot. Lowering rewrites canonical
attention into it; its outputs depend on the cache, which is why it only runs inside the runtime.
Dispatch is by device: the Triton decode kernel on CUDA, the exact torch reference elsewhere.
"""

from __future__ import annotations

import torch

from tokenpass.ir.ops import CACHED_ATTENTION
from tokenpass.kernels.cache_attention_ref import cache_attention_reference
from tokenpass.runtime.context import active_cache

def attend_cache(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid, scale: float) -> torch.Tensor:
    """Attention of ``query`` over cache slots: Triton decode kernel on CUDA, torch reference otherwise."""
    if query.is_cuda and query.shape[2] == 1:
        from tokenpass.kernels.decode_attention import decode_attention

        return decode_attention(query, keys, values, valid, scale)
    return cache_attention_reference(query, keys, values, valid, scale)


@torch.library.impl(CACHED_ATTENTION, "CompositeExplicitAutograd")
def cached_attention(
    query: torch.Tensor, key_new: torch.Tensor, value_new: torch.Tensor, scale: float, layer: int
) -> torch.Tensor:
    cache = active_cache()
    layer_cache = cache.stage(layer, key_new, value_new)
    slots = layer_cache.length + key_new.shape[2]
    valid = None if cache.all_valid else layer_cache.valid[:, :, :slots]
    return attend_cache(query, layer_cache.keys[:, :, :slots], layer_cache.values[:, :, :slots], valid, scale)
