"""Runtime implementations of TidalDecode's ops over the active KV cache (CPU references, CUDA kernels).

Built on the core runtime helpers (``staged``, ``attend_slots``, ``count_read``), so staging, masking
and KV-read accounting are the same as for dense attention. Outputs are made contiguous, as the fake
implementations declare (compiled graphs rely on it; see ``tokenpass/runtime/ops.py``).
"""

from __future__ import annotations

import torch

from tokenpass.kernels.sparse_attention_ref import (
    decode_scores,
    ranking_scores,
    selection_attention_reference,
    top_slots,
)
from tokenpass.methods.tidaldecode.ops import SCORE_KEYS, SELECTION_ATTENTION, SPARSE_ATTENTION
from tokenpass.runtime.context import active_cache
from tokenpass.runtime.ops import attend_slots, count_read, staged


@torch.library.impl(SELECTION_ATTENTION, "CompositeExplicitAutograd")
def selection_attention(query, key_new, value_new, scale, layer, top_k, per_kv_head, sparse_output,
                        score_dtype=None, score_channels=0, softcap=None):
    keys, values, valid = staged(layer, key_new, value_new)
    if sparse_output and top_k >= keys.shape[2] - 1:  # the choice is every past slot: nothing to rank
        heads = keys.shape[1] if per_kv_head else query.shape[1]
        slots = torch.arange(keys.shape[2] - 1, device=keys.device).expand(keys.shape[0], heads, -1)
        return attend_slots(query, keys, values, valid, slots, scale, softcap).contiguous(), slots.contiguous()
    if sparse_output:  # rank every slot, then attend over the choice only
        scores = _ranking_scores(query, keys, valid, scale, layer, score_dtype, score_channels, softcap)
        slots = top_slots(scores, top_k, per_kv_head).contiguous()
        return attend_slots(query, keys, values, valid, slots, scale, softcap).contiguous(), slots
    count_read(keys, values)
    if not query.is_cuda:
        out, slots = selection_attention_reference(query, keys, values, valid, scale, top_k, per_kv_head, False,
                                                   softcap)
        return out.contiguous(), slots.contiguous()
    from tokenpass.kernels.decode_attention import decode_attention

    out, scores = decode_attention(query, keys, values, valid, scale, return_scores=True, softcap=softcap)
    return out.contiguous(), top_slots(scores, top_k, per_kv_head).contiguous()  # one pass over K gave both


def _ranking_scores(query, keys, valid, scale: float, layer: int, score_dtype, score_channels: int,
                    softcap: float | None) -> torch.Tensor:
    """Scores to rank slots by: exact from the keys, or approximate from the cache's channel-major key copy
    (the ``SCORE_KEYS`` state: ``score_dtype``, ``score_channels`` of its channels), which reads fewer bytes."""
    if score_dtype is None and not score_channels:
        count_read(keys)
        return decode_scores(query, keys, valid, scale, softcap)
    score_keys = active_cache().state(layer, SCORE_KEYS)[..., : keys.shape[2]]
    count_read(score_keys[:, :, : score_channels or score_keys.shape[2]])
    return ranking_scores(query, score_keys, valid, scale, score_channels, softcap)


@torch.library.impl(SPARSE_ATTENTION, "CompositeExplicitAutograd")
def sparse_attention(query, key_new, value_new, slots, scale, layer, softcap=None):
    keys, values, valid = staged(layer, key_new, value_new)
    return attend_slots(query, keys, values, valid, slots, scale, softcap).contiguous()
