"""Runtime implementations of the IR's cache-reading attention ops.

Each op stages the step's new keys/values into its layer of the active cache, then attends: over every
live slot (``cached_attention``), over every slot while also choosing the top slots
(``selection_attention``), or over chosen slots only (``sparse_attention``). Their outputs depend on the
cache, which is why they only run inside the runtime. Dense decode dispatches by device: the Triton
kernel on CUDA, the exact torch reference elsewhere.
"""

from __future__ import annotations

import torch

from tokenpass.ir.ops import CACHED_ATTENTION, SELECTION_ATTENTION, SPARSE_ATTENTION
from tokenpass.kernels.cache_attention_ref import cache_attention_reference
from tokenpass.kernels.sparse_attention_ref import (
    ranking_scores,
    selection_attention_reference,
    sparse_attention_reference,
    top_slots,
)
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
    keys, values, valid = _staged(layer, key_new, value_new)
    return attend_cache(query, keys, values, valid, scale)


def _staged(layer: int, key_new: torch.Tensor, value_new: torch.Tensor):
    """Stage the step's keys/values; return the layer's live keys, values and validity (None: all live)."""
    cache = active_cache()
    layer_cache = cache.stage(layer, key_new, value_new)
    slots = layer_cache.length + key_new.shape[2]
    valid = None if cache.all_valid else layer_cache.valid[:, :, :slots]
    return layer_cache.keys[:, :, :slots], layer_cache.values[:, :, :slots], valid


def attend_slots(query, keys, values, valid, slots, scale: float) -> torch.Tensor:
    """Attention over selected slots: Triton sparse kernel on CUDA, torch reference otherwise."""
    if query.is_cuda:
        from tokenpass.kernels.sparse_decode_attention import sparse_decode_attention

        return sparse_decode_attention(query, keys, values, valid, slots, scale)
    return sparse_attention_reference(query, keys, values, valid, slots, scale)


@torch.library.impl(SELECTION_ATTENTION, "CompositeExplicitAutograd")
def selection_attention(query, key_new, value_new, scale, layer, top_k, per_kv_head, sparse_output,
                        score_dtype=None, score_channels=0):
    keys, values, valid = _staged(layer, key_new, value_new)
    if sparse_output and (score_dtype is not None or score_channels):
        # Ranking reads the cache's key copy (fewer bytes); the output reads the chosen slots only.
        score_keys = active_cache().score_keys(layer, score_dtype or keys.dtype)[..., : keys.shape[2]]
        slots = top_slots(ranking_scores(query, score_keys, valid, scale, score_channels), top_k, per_kv_head)
        return attend_slots(query, keys, values, valid, slots, scale), slots
    if not query.is_cuda:
        return selection_attention_reference(query, keys, values, valid, scale, top_k, per_kv_head, sparse_output)
    from tokenpass.kernels.decode_attention import decode_attention

    out, scores = decode_attention(query, keys, values, valid, scale, return_scores=True)
    slots = top_slots(scores, top_k, per_kv_head)
    if sparse_output:
        out = attend_slots(query, keys, values, valid, slots, scale)
    return out, slots


@torch.library.impl(SPARSE_ATTENTION, "CompositeExplicitAutograd")
def sparse_attention(query, key_new, value_new, slots, scale, layer):
    keys, values, valid = _staged(layer, key_new, value_new)
    return attend_slots(query, keys, values, valid, slots, scale)
