"""H2O (heavy-hitter oracle): keep the tokens with the most accumulated attention plus a recent window.

Keyformer's machinery without noise and at temperature 1: the score is the attention each slot has
received so far, summed over queries and the KV head's query heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tokenpass.methods.kvevict import KVEviction
from tokenpass.passes.registry import register


@register
@dataclass(repr=True)
class H2O(KVEviction):
    """Half the budget heavy hitters, half a recent window (the paper's split)."""

    name: ClassVar[str] = "h2o"

    recent_ratio: float = 0.5

    def policy_options(self) -> dict[str, object]:
        return {**super().policy_options(), "recent_ratio": self.recent_ratio}
