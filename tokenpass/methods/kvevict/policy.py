"""The eviction policy: after each step, every layer drops slots beyond each sequence's budget.

Per sequence and KV head, live slots are *protected* (the first ``sinks`` positions and a recent window
of ``recent_ratio`` of the budget, by position) or *candidates*; when a head holds more live slots than
its sequence's budget, the candidates with the lowest score go: the accumulated attention the scored
op wrote (Keyformer, H2O) or, with ``score="position"``, the oldest (StreamingLLM). Eviction is
cumulative (a dropped slot never returns) and physical (``KVCache.retain`` compacts and frees memory).

Budgets are fixed from the prompt when it ends: a fraction of each row's own prompt, or a count. With
``interval`` > 1 decode steps evict only every ``interval``-th step (the prompt's end always evicts).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenpass.methods.kvevict.budget import row_budgets
from tokenpass.methods.kvevict.ops import PROMPT_END, SCORES
from tokenpass.methods.kvevict.victims import choose_victims
from tokenpass.runtime.kv_cache import KVCache
from tokenpass.runtime.policy import Policy, Step, register_policy

POLICY = "kvevict"
BUDGETS = "kvevict.budgets"  # cache note: [B] slots each row keeps per head
EVICTED = "kvevict.evicted"  # cache note: slots dropped so far, summed over layers, rows and heads


@register_policy
class Evict(Policy):
    name: ClassVar[str] = POLICY

    def __init__(self, budget: float | int, recent_ratio: float = 0.0, sinks: int = 0,
                 score: Literal["accumulated", "position"] = "accumulated", interval: int = 1):
        self.budget, self.recent_ratio, self.sinks, self.score = budget, recent_ratio, sinks, score
        self.interval = interval
        self.prompt_lengths: torch.Tensor | None = None

    def after_step(self, session, step: Step) -> None:
        cache = session.cache
        if step.phase == "prefill":
            lengths = step.token_valid.long().sum(1)
            self.prompt_lengths = lengths if self.prompt_lengths is None else self.prompt_lengths + lengths
            cache.notes[PROMPT_END] = cache.sequence_length
            cache.notes[BUDGETS] = row_budgets(self.budget, self.prompt_lengths)
        elif (cache.sequence_length - int(cache.notes.get(PROMPT_END, 0))) % self.interval:
            return  # between evictions (evict_interval > 1)
        budgets = cache.notes.get(BUDGETS)
        if budgets is None:  # decode without a prompt step (not reachable through generate)
            budgets = cache.notes[BUDGETS] = row_budgets(self.budget, step.token_valid.long().sum(1))
        last = step.positions.max(1).values  # [B] the newest position of each row
        for layer in range(len(cache.layers)):
            self.evict(cache, layer, budgets, last)

    def evict(self, cache: KVCache, layer: int, budgets: torch.Tensor, last: torch.Tensor) -> None:
        """Drop each head's lowest-scoring candidates until it holds at most its row's budget."""
        c = cache.layers[layer]
        valid = c.valid[:, :, : c.length]
        positions = c.positions[:, :, : c.length]
        rank = (c.states[SCORES][:, :, : c.length] if self.score == "accumulated" else positions.float())
        victims = choose_victims(valid, positions, rank, budgets, last, self.sinks, self.recent_ratio)
        if victims is None:
            return
        cache.retain(layer, valid & ~victims)
        cache.notes[EVICTED] = int(cache.notes.get(EVICTED, 0)) + int(victims.sum())
