"""Exact torch reference of TokenSelect's scoring: per-head soft voting over candidate slots.

Every query head scores every candidate slot, ``s_h(j) = q_h . k_j * scale`` (soft-capped where the
layer caps), turns its scores into a distribution over the candidates, and the heads vote with those
probabilities: ``S(j) = sum_h softmax_j(s_h(j))``. A head with one sharp peak and a head with a flat
spread then weigh the same, which raw score sums would not give. The query heads of a KV head read its
keys once (the group is folded into the rows). No attention output is produced.

Shapes: query ``[B, Hq, 1, D]``, keys ``[B, Hkv, S, D]``, ``candidates`` ``[B, S]`` bool (shared by the
heads: one selection serves the whole layer) or None (all). Returns ``[B, S]`` fp32, 0 where not a candidate.
"""

from __future__ import annotations

import torch

from tokenpass.kernels.cache_attention_ref import soft_cap


def soft_vote(query: torch.Tensor, keys: torch.Tensor, candidates: torch.Tensor | None, scale: float,
              softcap: float | None = None) -> torch.Tensor:
    """``candidates`` None: every slot is one (no mask to apply, no empty row to fix)."""
    b, hq, _, d = query.shape
    hkv = keys.shape[1]
    q = query.reshape(b, hkv, hq // hkv, d).float() * scale  # scaled before the product: no pass over the scores
    scores = soft_cap(torch.matmul(q, keys.float().transpose(-1, -2)), softcap)  # [B, Hkv, G, S]
    if candidates is None:
        return scores.softmax(-1).sum((1, 2))
    scores = scores.masked_fill(~candidates[:, None, None, :], float("-inf"))
    votes = scores.softmax(-1).nan_to_num_(0.0)  # a row without candidates votes for nothing
    return votes.sum((1, 2))
