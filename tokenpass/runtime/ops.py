"""Runtime implementations of the IR's cache-reading attention ops.

Each op stages the step's new keys/values into its layer of the active cache, then attends: over every
live slot (``cached_attention``), over every slot while also choosing the top slots
(``selection_attention``), or over chosen slots only (``sparse_attention``). Their outputs depend on the
cache, which is why they only run inside the runtime. Dense decode dispatches by device: the Triton
kernel on CUDA, the exact torch reference elsewhere. Each op adds the cache bytes it reads to the
cache's ``bytes_read`` (what the op touches by construction, not a hardware counter), so benchmarks can
report how much of the cache a step really reads.
"""

from __future__ import annotations

import torch

from tokenpass.ir.ops import CACHED_ATTENTION, SELECTION_ATTENTION, SPARSE_ATTENTION
from tokenpass.kernels.cache_attention_ref import cache_attention_reference
from tokenpass.kernels.sparse_attention_ref import (
    decode_scores,
    ranking_scores,
    selection_attention_reference,
    sparse_attention_reference,
    top_slots,
)
from tokenpass.runtime.context import active_cache


def _count_read(*tensors: torch.Tensor) -> None:
    active_cache().bytes_read += sum(t.numel() * t.element_size() for t in tensors)


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
    _count_read(keys, values)
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
    if slots.shape[-1] >= keys.shape[2] - 1:  # every past slot chosen: dense attention is the same, and cheaper
        _count_read(keys, values)
        return attend_cache(query, keys, values, valid, scale)
    row = keys.shape[-1] * (keys.element_size() + values.element_size())
    active_cache().bytes_read += (slots.numel() + slots.shape[0] * slots.shape[1]) * row  # + the own token
    if query.is_cuda:
        from tokenpass.kernels.sparse_decode_attention import sparse_decode_attention

        return sparse_decode_attention(query, keys, values, valid, slots, scale)
    return sparse_attention_reference(query, keys, values, valid, slots, scale)


@torch.library.impl(SELECTION_ATTENTION, "CompositeExplicitAutograd")
def selection_attention(query, key_new, value_new, scale, layer, top_k, per_kv_head, sparse_output,
                        score_dtype=None, score_channels=0):
    keys, values, valid = _staged(layer, key_new, value_new)
    if sparse_output and top_k >= keys.shape[2] - 1:  # the choice is every past slot: nothing to rank
        heads = keys.shape[1] if per_kv_head else query.shape[1]
        slots = torch.arange(keys.shape[2] - 1, device=keys.device).expand(keys.shape[0], heads, -1)
        return attend_slots(query, keys, values, valid, slots, scale), slots
    if sparse_output:  # rank every slot, then attend over the choice only
        scores = _ranking_scores(query, keys, valid, scale, layer, score_dtype, score_channels)
        slots = top_slots(scores, top_k, per_kv_head)
        return attend_slots(query, keys, values, valid, slots, scale), slots
    _count_read(keys, values)
    if not query.is_cuda:
        return selection_attention_reference(query, keys, values, valid, scale, top_k, per_kv_head, False)
    from tokenpass.kernels.decode_attention import decode_attention

    out, scores = decode_attention(query, keys, values, valid, scale, return_scores=True)  # one pass over K
    return out, top_slots(scores, top_k, per_kv_head)


def _ranking_scores(query, keys, valid, scale: float, layer: int, score_dtype, score_channels: int) -> torch.Tensor:
    """Scores to rank slots by: exact from the keys, or approximate from the cache's channel-major key copy
    (``score_dtype``, ``score_channels`` of its channels), which reads fewer bytes."""
    if score_dtype is None and not score_channels:
        _count_read(keys)
        return decode_scores(query, keys, valid, scale)
    score_keys = active_cache().score_keys(layer, score_dtype or keys.dtype)[..., : keys.shape[2]]
    _count_read(score_keys[:, :, : score_channels or score_keys.shape[2]])
    return ranking_scores(query, score_keys, valid, scale, score_channels)


@torch.library.impl(SPARSE_ATTENTION, "CompositeExplicitAutograd")
def sparse_attention(query, key_new, value_new, slots, scale, layer):
    keys, values, valid = _staged(layer, key_new, value_new)
    return attend_slots(query, keys, values, valid, slots, scale)
