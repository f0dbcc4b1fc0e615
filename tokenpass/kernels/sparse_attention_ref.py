"""Exact torch references of the sparse decode-attention ops (selection layer, sparse layer).

Shapes: one query token per sequence ``[B, Hq, 1, D]``; cache slots ``[B, Hkv, S, D]`` whose last slot
is the step's own token; ``valid`` ``[B, Hkv, S]`` or None when every slot is live. Selected slots are
``[B, Hsel, k]`` with ``Hsel`` the query heads, or the KV heads when selection is shared per KV head.

``softcap`` (Gemma 2's ``softcap * tanh(s / softcap)`` on scaled scores) is applied wherever scores feed
a softmax, before masking. A sliding window reaches these ops folded into ``valid``
(``cache_attention_ref.window_valid``): with one query token it is just more dead slots.
"""

from __future__ import annotations

import torch

from tokenpass.kernels.cache_attention_ref import check_softcap, soft_cap


def decode_scores(
    query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, scale: float, softcap: float | None = None
) -> torch.Tensor:
    """``q . k * scale`` as ``[B, Hkv, G, S]`` in fp32, dead slots at ``-inf`` (query groups folded, no KV copy).

    With ``softcap`` the scores are capped: they feed the dense output's softmax and the per-KV-head vote.
    """
    check_softcap(softcap)
    b, hq, _, d = query.shape
    hkv = keys.shape[1]
    q = query.reshape(b, hkv, hq // hkv, d).float()
    scores = soft_cap(torch.matmul(q, keys.float().transpose(-1, -2)) * scale, softcap)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    return scores


def ranking_scores(
    query: torch.Tensor, score_keys: torch.Tensor, valid: torch.Tensor | None, scale: float, channels: int = 0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Approximate ``decode_scores`` for ranking, from a channel-major key copy ``[B, Hkv, D, S]``.

    With ``0 < channels < D`` only the ``channels`` channels where the KV head's query group has the
    largest summed magnitude are read (SparQ's approximation: those channels dominate ``q . k``), as
    contiguous rows of the copy, so ranking reads ``channels / D`` of the keys. The product runs in the
    copy's dtype (fp32 accumulation inside the GEMM, rounded on output): the scores only rank slots.

    ``softcap`` caps them (in fp32). Per-query-head top-k would not need it (tanh is monotonic, so the
    order is the same), but the per-KV-head vote sums softmax probabilities, which the cap changes.
    """
    check_softcap(softcap)
    b, hq, _, d = query.shape
    hkv, s = score_keys.shape[1], score_keys.shape[-1]
    q = query.reshape(b, hkv, hq // hkv, d).to(score_keys.dtype)
    if 0 < channels < d:
        picked = q.abs().float().sum(2).topk(channels, dim=-1).indices  # [B, Hkv, r]
        q = q.gather(-1, picked[:, :, None, :].expand(-1, -1, q.shape[2], -1))
        rows = (torch.arange(b * hkv, device=q.device).view(b, hkv, 1) * d + picked).reshape(-1)
        score_keys = score_keys.flatten(0, 2).index_select(0, rows).view(b, hkv, channels, s)
    scores = soft_cap(torch.matmul(q, score_keys).float() * scale, softcap)
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
    serves every query head that reads that KV head. Those probabilities are the softmax of ``scores``
    as given, so a soft-capped layer must pass capped scores (``decode_scores(..., softcap)``); per query
    head, raw and capped scores give the same top-k (tanh is monotonic).
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
    top_k: int, per_kv_head: bool, sparse_output: bool, softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention output (or, with ``sparse_output``, attention over its own selection) and top slots.

    One pass over the keys yields both the scores for selection and, for the dense output, the weights.
    With ``softcap`` both use capped scores (the per-KV-head vote sums capped probabilities).
    """
    scores = decode_scores(query, keys, valid, scale, softcap)
    slots = top_slots(scores, top_k, per_kv_head)
    if sparse_output:
        return sparse_attention_reference(query, keys, values, valid, slots, scale, softcap), slots
    return attend_with_scores(scores, values, query.dtype), slots


def cache_rows(x: torch.Tensor) -> torch.Tensor:
    """A ``[B, H, S, D]`` cache view (unit last stride) as 2-D rows over the same storage, no copy.

    Cache views are slices of larger buffers, so ``reshape`` would copy the whole cache; selecting rows
    of the underlying storage reads only the chosen slots.
    """
    b, h, s, d = x.shape
    sb, sh, ss, sd = x.stride()
    if sd != 1 or ss != d:
        x = x.contiguous()
        sb, sh, ss, _ = x.stride()
    rows = ((b - 1) * sb + (h - 1) * sh) // d + s
    return x.as_strided((rows, d), (d, 1), x.storage_offset())


def sparse_attention_reference(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None,
    slots: torch.Tensor, scale: float, softcap: float | None = None,
) -> torch.Tensor:
    """Attention over the selected ``slots`` plus the step's own slot (always attended).

    With ``softcap`` the capped scores are written out (SDPA cannot cap): fp32 scores and softmax, output
    in the query dtype, as SDPA computes these dtypes.
    """
    check_softcap(softcap)
    b, hq, _, d = query.shape
    hkv, s = keys.shape[1], keys.shape[2]
    index = torch.cat([slots, slots.new_full((*slots.shape[:2], 1), s - 1)], dim=-1)  # [B, Hsel, k+1]
    hsel = index.shape[1]
    head = (torch.arange(hsel, device=index.device) // (hsel // hkv))[None, :, None]
    batch = torch.arange(b, device=index.device)[:, None, None]
    k_sel = cache_rows(keys).index_select(0, _row_index(keys, batch, head, index)).view(b, hsel, -1, d)
    v_sel = cache_rows(values).index_select(0, _row_index(values, batch, head, index)).view(b, hsel, -1, d)
    mask = None
    if valid is not None:
        mask = valid[batch, head, index]  # [B, Hsel, k+1]
        mask[..., -1] = True
        mask = mask[:, :, None, :]
    q = query.reshape(b, hsel, hq // hsel, d)  # query heads grouped under the head that chose their slots
    if softcap is not None:
        return _capped_attention(q, k_sel, v_sel, mask, scale, softcap).reshape(b, hq, 1, d)
    out = torch.nn.functional.scaled_dot_product_attention(q, k_sel, v_sel, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, 1, d)


def _capped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, softcap: float
) -> torch.Tensor:
    """SDPA's arithmetic (fp32 scores and softmax, output in ``q``'s dtype) with capped scores."""
    scores = soft_cap(torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale, softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)


def _row_index(x: torch.Tensor, batch: torch.Tensor, head: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    sb, sh, ss, _ = x.stride() if x.stride(-1) == 1 and x.stride(2) == d else x.contiguous().stride()
    return (batch * (sb // d) + head * (sh // d) + slot * (ss // d)).reshape(-1)
