"""TidalDecode's cache correction as a run-time policy: dense re-encoding every ``interval`` decode steps.

Sparse decode layers compute each new token's keys/values from an approximate context; re-running the
last ``interval`` tokens through the dense prefill graph overwrites those entries and bounds the drift
over long generations (the paper's correction, absent from its released code). The pass names the
policy on the decode graph; the runtime builds it per session, so ``generate`` and the bench's
teacher-forced loop both correct without knowing about it.
"""

from __future__ import annotations

import torch

from tokenpass.runtime.policy import Policy, Step, register_policy
from tokenpass.runtime.session import Session

POLICY = "tidaldecode.cache_correction"


@register_policy
class CacheCorrection(Policy):
    name = POLICY

    def __init__(self, interval: int):
        self.interval = interval
        self.ids: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []

    def after_step(self, session: Session, step: Step) -> None:
        """Record each decode step's token; once ``interval`` are pending, re-encode them densely."""
        if step.phase != "decode":
            return
        self.ids.append(step.input_ids)
        self.positions.append(step.positions)
        if len(self.ids) < self.interval:
            return
        ids, positions = torch.cat(self.ids, 1), torch.cat(self.positions, 1)
        self.ids, self.positions = [], []
        session.cache.rewind(ids.shape[1])
        session.run("prefill", ids, torch.ones_like(ids), positions, last_only=True)
