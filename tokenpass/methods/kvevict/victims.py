"""Which slots an eviction drops: the one rule of the runtime's and the explicit cache's policies."""

from __future__ import annotations

import torch

from tokenpass.methods.kvevict.budget import recent_counts


def choose_victims(valid: torch.Tensor, positions: torch.Tensor, rank: torch.Tensor, budgets: torch.Tensor,
                   last: torch.Tensor, sinks: int, recent_ratio: float) -> torch.Tensor | None:
    """``[B, H, S]`` bool: per sequence and head, the lowest-``rank`` candidates beyond the row's budget.

    Live slots are *protected* (positions below ``sinks``, and the recent window of ``recent_ratio`` of
    the budget ending at the row's newest position ``last`` ``[B]``) or candidates; a head holding more
    live slots than its row's budget ``[B]`` loses that many candidates (fewer if protection leaves too
    few). None: nothing to drop."""
    excess = valid.sum(-1) - budgets.to(valid.device)[:, None]  # [B, H]
    drop = int(excess.max())
    if drop <= 0:
        return None
    recent = recent_counts(budgets, recent_ratio).to(valid.device)
    protected = (positions < sinks) | (positions > (last.to(valid.device) - recent)[:, None, None])
    candidates = valid & ~protected
    rank = rank.masked_fill(~candidates, float("inf"))
    lowest = rank.topk(min(drop, rank.shape[-1]), dim=-1, largest=False)
    chosen = torch.arange(lowest.indices.shape[-1], device=valid.device) < excess[..., None]
    chosen &= lowest.values.isfinite()
    return torch.zeros_like(valid).scatter_(-1, lowest.indices, chosen)
