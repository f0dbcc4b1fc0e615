"""Runtime implementation of the core cache-reading attention op, and the helpers method ops build on.

``cached_attention`` stages the step's new keys/values into its layer of the active cache, then
attends over every live slot the layer may see (all of them, or those inside its sliding window). Its
output depends on the cache, which is why it only runs inside the runtime. Decode dispatches by device:
the Triton kernel on CUDA, the exact torch reference elsewhere. Ops add the cache bytes they read to
the cache's ``bytes_read`` (what the op touches by construction, not a hardware counter), so benchmarks
can report how much of the cache a step really reads.

Op outputs are contiguous, as their fake implementations declare: compiled graphs (Inductor) lay out
the buffers downstream of an op from its fake and assert the real strides match (SDPA on CPU returns a
``[B, T, H, D]``-strided result for multi-token queries). ``contiguous()`` copies only in that case.

Method ops (``tokenpass/methods/*``) reuse ``staged``, ``attend_cache``, ``attend_slots`` and
``count_read`` so every op stages, masks and accounts the same way.
"""

from __future__ import annotations

import torch

from tokenpass.ir.ops import CACHED_ATTENTION
from tokenpass.kernels import cache_attention_ref as ref
from tokenpass.kernels.sparse_attention_ref import sparse_attention_reference
from tokenpass.runtime.context import active_cache


def count_read(*tensors: torch.Tensor) -> None:
    """Account ``tensors`` as cache bytes read by the running op."""
    active_cache().bytes_read += sum(t.numel() * t.element_size() for t in tensors)


def staged(layer: int, key_new: torch.Tensor, value_new: torch.Tensor, window: int = 0):
    """Stage the step's keys/values; return the layer's keys, values and validity (None: all live).

    With a sliding ``window`` and a one-token step, slots outside the window are folded into the
    validity, so every decode kernel handles windows without knowing about them.
    """
    cache = active_cache()
    layer_cache = cache.stage(layer, key_new, value_new)
    slots = layer_cache.length + key_new.shape[2]
    valid = None if cache.all_valid else layer_cache.valid[:, :, :slots]
    if window and key_new.shape[2] == 1:
        positions = layer_cache.positions[:, :, :slots]
        valid = ref.window_valid(valid, positions, cache.step_positions, window)
    return layer_cache.keys[:, :, :slots], layer_cache.values[:, :, :slots], valid


def attend_cache(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid, scale: float,
                 softcap: float | None = None, window: int = 0, layer: int | None = None) -> torch.Tensor:
    """Attention of ``query`` over cache slots: Triton decode kernel on CUDA, torch reference otherwise.

    Multi-token steps with a ``window`` need each query's own horizon, so they read the slot positions
    of ``layer`` (decode steps already carry the window in ``valid``, see ``staged``).
    """
    if query.is_cuda and query.shape[2] == 1:
        from tokenpass.kernels.decode_attention import decode_attention

        return decode_attention(query, keys, values, valid, scale, softcap=softcap)
    if window and query.shape[2] > 1:
        cache = active_cache()
        positions = cache.layers[layer].positions[:, :, : keys.shape[2]]
        return ref.cache_attention_reference(query, keys, values, valid, scale, softcap=softcap, window=window,
                                             slot_positions=positions, query_positions=cache.step_positions)
    return ref.cache_attention_reference(query, keys, values, valid, scale, softcap=softcap)


def attend_slots(query, keys, values, valid, slots, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Attention over chosen ``slots`` ``[B, H, k]`` plus the step's own slot: Triton sparse kernel on
    CUDA, torch reference otherwise; dense when the choice is every past slot (same result, cheaper)."""
    if slots.shape[-1] >= keys.shape[2] - 1:
        count_read(keys, values)
        return attend_cache(query, keys, values, valid, scale, softcap)
    row = keys.shape[-1] * (keys.element_size() + values.element_size())
    active_cache().bytes_read += (slots.numel() + slots.shape[0] * slots.shape[1]) * row  # + the own token
    if query.is_cuda:
        from tokenpass.kernels.sparse_decode_attention import sparse_decode_attention

        return sparse_decode_attention(query, keys, values, valid, slots, scale, softcap=softcap)
    return sparse_attention_reference(query, keys, values, valid, slots, scale, softcap=softcap)


@torch.library.impl(CACHED_ATTENTION, "CompositeExplicitAutograd")
def cached_attention(query: torch.Tensor, key_new: torch.Tensor, value_new: torch.Tensor, scale: float, layer: int,
                     softcap: float | None = None, window: int = 0) -> torch.Tensor:
    keys, values, valid = staged(layer, key_new, value_new, window)
    count_read(keys, values)
    return attend_cache(query, keys, values, valid, scale, softcap, window, layer).contiguous()
