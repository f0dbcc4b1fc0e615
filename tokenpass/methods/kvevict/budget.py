"""KV budgets as eviction methods take them: a fraction of the prompt or an absolute token count."""

from __future__ import annotations

import torch

from tokenpass.errors import PassError


def check_budget(method: str, budget: float | int) -> None:
    """A float is a fraction of the prompt in ``(0, 1]``; an int is a count of tokens, at least 1."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise PassError(f"{method}: kv_budget must be a fraction of the prompt (0 < f <= 1) or a token count, "
                        f"got {budget!r}")
    if isinstance(budget, float) and not 0 < budget <= 1:
        raise PassError(f"{method}: kv_budget={budget} as a fraction of the prompt must be in (0, 1]; "
                        "give an integer for an absolute number of tokens")
    if isinstance(budget, int) and budget < 1:
        raise PassError(f"{method}: kv_budget={budget} tokens must be at least 1")


def check_ratio(method: str, name: str, value: float) -> None:
    """A share of the budget, in ``[0, 1]``."""
    if not 0 <= value <= 1:
        raise PassError(f"{method}: {name}={value} must be in [0, 1] (a share of kv_budget)")


def row_budgets(budget: float | int, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """Slots each sequence keeps per head, ``[B]``: ``budget`` tokens, or that fraction of its own prompt
    (so a left-padded row gets the budget it would get alone), at least one."""
    if isinstance(budget, float):
        return (prompt_lengths.double() * budget).ceil().clamp(min=1).long()
    return torch.full_like(prompt_lengths, budget)


def recent_counts(budgets: torch.Tensor, recent_ratio: float) -> torch.Tensor:
    """The recent window of each row, ``[B]``: ``recent_ratio`` of its budget (rounded down)."""
    return (budgets.double() * recent_ratio).floor().long() if recent_ratio < 1 else budgets.clone()
