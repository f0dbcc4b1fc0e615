"""Keyformer: evict all but the key tokens, ranked by Gumbel-regularised accumulated attention.

Per layer and KV head the score is ``F_t = F_{t-1} + sum over queries (and the KV head's query heads)
of softmax((x + g) / tau_t)``, ``x = q . k / sqrt(d)``, ``g`` Gumbel(0, 1), ``tau_t`` rising linearly
from ``tau_init`` to ``tau_end`` over ``tau_horizon`` decode steps. Prefill attends fully and is scored
by every prompt query; the cache then keeps ``kv_budget`` slots per sequence and head: a recent window
of ``recent_ratio`` of it, and the highest-``F`` older tokens. Eviction follows prefill and every decode
step, so memory stays bounded however long the generation.

Beyond the reference code (which sums scores over the batch and has no GQA): selection per sequence
and per KV head, per-row budgets from each row's own prompt, keys keep their original positions, the
noise is a hash of (seed, layer, head, positions) so a row gets the same noise alone and in any batch,
and ``noise=False`` gives the noise-free variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tokenpass.errors import PassError
from tokenpass.methods.kvevict import KVEviction
from tokenpass.passes.registry import register


@register
@dataclass(repr=True)
class Keyformer(KVEviction):
    """Defaults are the paper's: 60% of the prompt, 30% of it a recent window, tau 1 -> 2."""

    name: ClassVar[str] = "keyformer"

    recent_ratio: float = 0.3
    tau_init: float = 1.0
    tau_end: float = 2.0
    tau_horizon: int = 512
    noise: bool = True
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if not (self.tau_init > 0 and self.tau_end > 0):
            raise PassError(f"keyformer: tau_init and tau_end must be positive, got {self.tau_init}, {self.tau_end}")
        if self.tau_horizon < 1:
            raise PassError(f"keyformer: tau_horizon must be a positive number of decode steps, got {self.tau_horizon}")

    def policy_options(self) -> dict[str, object]:
        return {**super().policy_options(), "recent_ratio": self.recent_ratio}

    def score_options(self) -> tuple:
        return (self.noise, self.tau_init, self.tau_end, self.tau_horizon, self.seed)
