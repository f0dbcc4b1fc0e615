"""Exact torch references of the sparse decode-attention ops (selection layer, sparse layer).

Shapes: one query token per sequence ``[B, Hq, 1, D]``; cache slots ``[B, Hkv, S, D]`` whose last slot
is the step's own token; ``valid`` ``[B, Hkv, S]`` or None when every slot is live. Selected slots are
``[B, Hsel, k]`` with ``Hsel`` the query heads, or the KV heads when selection is shared per KV head.
"""

from __future__ import annotations

import torch


def decode_scores(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``q . k * scale`` as ``[B, Hkv, G, S]`` in fp32, dead slots at ``-inf`` (query groups folded, no KV copy)."""
    b, hq, _, d = query.shape
    hkv = keys.shape[1]
    q = query.reshape(b, hkv, hq // hkv, d).float()
    scores = torch.matmul(q, keys.float().transpose(-1, -2)) * scale
    if valid is not None:
        scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    return scores


def attend_with_scores(scores: torch.Tensor, values: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Softmax over the last axis of ``[B, Hkv, G, S]`` scores, times ``[B, Hkv, S, D]`` values -> ``[B, Hq, 1, D]``."""
    probs = scores.softmax(-1)
    out = torch.matmul(probs, values.float())
    b, hkv, g, d = out.shape
    return out.reshape(b, hkv * g, 1, d).to(out_dtype)


def top_slots(scores: torch.Tensor, top_k: int, per_kv_head: bool) -> torch.Tensor:
    """The ``top_k`` past slots (the step's own slot excluded) by score, per query head or per KV head.

    Per KV head, the group's heads vote with their attention probabilities (summed), so one selection
    serves every query head that reads that KV head.
    """
    past = scores[..., :-1]
    if per_kv_head:
        ranking = past.softmax(-1).nan_to_num(0.0).sum(2)  # [B, Hkv, S-1]
    else:
        b, hkv, g, s = past.shape
        ranking = past.reshape(b, hkv * g, s)
    k = min(top_k, ranking.shape[-1])
    return ranking.topk(k, dim=-1, sorted=False).indices


def selection_attention_reference(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, scale: float,
    top_k: int, per_kv_head: bool, sparse_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention output (or, with ``sparse_output``, attention over its own selection) and top slots.

    One pass over the keys yields both the scores for selection and, for the dense output, the weights.
    """
    scores = decode_scores(query, keys, valid, scale)
    slots = top_slots(scores, top_k, per_kv_head)
    if sparse_output:
        return sparse_attention_reference(query, keys, values, valid, slots, scale), slots
    return attend_with_scores(scores, values, query.dtype), slots


def sparse_attention_reference(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None,
    slots: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Attention over the selected ``slots`` plus the step's own slot (always attended)."""
    b, hq, _, d = query.shape
    hkv, s = keys.shape[1], keys.shape[2]
    current = slots.new_full((*slots.shape[:2], 1), s - 1)
    index = torch.cat([slots, current], dim=-1)
    index = index.reshape(b, hkv, index.shape[1] // hkv, index.shape[-1])  # [B, Hkv, G or 1, k+1]
    expanded = (b, hkv, index.shape[2], s, d)
    gather_index = index[..., None].expand(*index.shape, d)
    k_sel = keys[:, :, None].expand(expanded).gather(3, gather_index)
    v_sel = values[:, :, None].expand(expanded).gather(3, gather_index)
    q = query.reshape(b, hkv, hq // hkv, 1, d).float()
    scores = torch.matmul(q, k_sel.float().transpose(-1, -2)) * scale  # [B, Hkv, G, 1, k+1]
    if valid is not None:
        live = valid[:, :, None].expand(b, hkv, index.shape[2], s).gather(3, index)
        scores = scores.masked_fill(~live[:, :, :, None, :], float("-inf"))
    out = torch.matmul(scores.softmax(-1), v_sel.float())  # [B, Hkv, G, 1, D]
    return out.reshape(b, hq, 1, d).to(query.dtype)
