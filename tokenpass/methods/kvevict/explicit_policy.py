"""KV eviction on an explicit cache: the torch runtime's explicit session and the ONNX runtime.

The steps return each layer's ``cat(past, new)`` keys and values and, for scoring methods, the output
group ``kv_scores`` (``explicit_ops.py``); this policy keeps what the runtime's cache keeps beside its
slots (each slot's position and accumulated score, per layer and KV head), adds the step's scores,
and evicts with the runtime policy's rule (``victims.choose_victims``): the same budgets, recent
window, sinks and interval.

Compaction keeps each head's surviving slots in order and right-aligns them, so the cache stays what a
causal + padding mask describes: every head and layer of a row holds the same number of live slots
(each starts from the row's prompt and is cut to the row's budget), and the step's ``attention_mask``
over the compacted cache is that row's count of ones on the right, like left padding. A row whose heads
disagree would need a per-head mask; it is refused rather than attended wrongly.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenpass.errors import TokenpassError
from tokenpass.kernels.scored_attention_ref import score_contribution, scored_attention_reference, temperature
from tokenpass.methods.kvevict.budget import row_budgets
from tokenpass.methods.kvevict.victims import choose_victims
from tokenpass.runtime.policy import Policy, Step, register_policy

EXPLICIT_POLICY = "kvevict.explicit"
SCORES_OUTPUT = "kv_scores"  # the steps' output group: per layer, what explicit_scored_attention returns
QUERIES_OUTPUT = "kv_queries"  # a noisy prompt step's output group: per layer, the attention's queries


@register_policy
class ExplicitEvict(Policy):
    name: ClassVar[str] = EXPLICIT_POLICY
    explicit: ClassVar[bool] = True

    def __init__(self, budget: float | int, recent_ratio: float = 0.0, sinks: int = 0,
                 score: Literal["accumulated", "position"] = "accumulated", interval: int = 1, noise: bool = False,
                 tau_init: float = 1.0, tau_end: float = 1.0, tau_horizon: int = 0, seed: int = 0,
                 scales: tuple[float, ...] = (), softcaps: tuple[float | None, ...] = ()):
        self.budget, self.recent_ratio, self.sinks, self.score = budget, recent_ratio, sinks, score
        self.interval, self.noise, self.seed = interval, noise, seed
        self.tau = (tau_init, tau_end, tau_horizon)
        self.scales, self.softcaps = scales, softcaps  # per layer: to score a prompt from its queries
        self.prompt_lengths: torch.Tensor | None = None
        self.budgets: torch.Tensor | None = None
        self.decoded = 0  # decode steps since the prompt ended
        self.positions: list[torch.Tensor] = []  # per layer [B, Hkv, S]: each slot's position
        self.scores: list[torch.Tensor] = []  # per layer [B, Hkv, S] fp32: accumulated score
        self.evicted = 0  # slots dropped so far, summed over layers, rows and heads

    def after_step(self, session, step: Step) -> None:
        cache = session.cache
        self._grow(cache, step)
        if step.phase == "prefill":
            lengths = step.token_valid.long().sum(1)
            self.prompt_lengths = lengths if self.prompt_lengths is None else self.prompt_lengths + lengths
            self.budgets, self.decoded = row_budgets(self.budget, self.prompt_lengths), 0
        else:
            self.decoded += 1
            if self.decoded % self.interval:
                return  # between evictions
        if self.budgets is None:  # decode without a prompt step (not reachable through generate)
            self.budgets = row_budgets(self.budget, step.token_valid.long().sum(1))
        self._evict(cache, step.positions.max(1).values)

    def _grow(self, cache, step: Step) -> None:
        """The step's new slots get their positions, and every slot the step's score."""
        b, t = step.input_ids.shape
        for layer, keys in enumerate(cache.keys):
            hkv, s = keys.shape[1], keys.shape[2]
            new = step.positions[:, None, :].expand(b, hkv, t)
            if layer == len(self.positions):
                self.positions.append(keys.new_empty((b, hkv, 0), dtype=torch.long))
                self.scores.append(keys.new_zeros((b, hkv, 0), dtype=torch.float32))
            self.positions[layer] = torch.cat([self.positions[layer], new], -1)
            self.scores[layer] = torch.cat([self.scores[layer], self.scores[layer].new_zeros((b, hkv, t))], -1)
            if self.positions[layer].shape[-1] != s:
                raise TokenpassError(f"{self.name}: layer {layer} holds {s} slots, the policy tracked "
                                     f"{self.positions[layer].shape[-1]}")
            if self.score == "accumulated":
                self.scores[layer] += self._contribution(cache, layer, step)

    def _contribution(self, cache, layer: int, step: Step) -> torch.Tensor:
        """A prompt step's summed contribution as the graph returns it, or scored here from its queries
        (noise); a decode step's finished here from its masked scores, at the step's temperature (and
        noise), as the runtime's decode path does."""
        if QUERIES_OUTPUT in cache.outputs:
            return self._prompt_contribution(cache, layer, step)
        scores = cache.outputs[SCORES_OUTPUT][layer]
        if step.phase == "prefill":
            return scores
        tau = temperature(*self.tau[:2], self.decoded, self.tau[2])
        return score_contribution(scores[:, :, :, None, :], tau, self.noise, self.seed, layer, step.positions,
                                  self.positions[layer])

    def _prompt_contribution(self, cache, layer: int, step: Step) -> torch.Tensor:
        """``sum softmax((x + g) / tau_init)`` over the step's real queries, from its queries and the cache's
        keys: the runtime's own prompt scoring (``scored_attention_reference``), with the positions kept here."""
        query, keys = cache.outputs[QUERIES_OUTPUT][layer], cache.keys[layer]
        t, s = query.shape[2], keys.shape[2]
        real = step.token_valid.bool()
        causal = torch.ones(t, s, dtype=torch.bool, device=keys.device).tril(s - t)
        keep = (cache.mask.bool()[:, None, :] & causal) | ~real[:, :, None]  # [B, T, S]; padding sees all
        _, contribution = scored_attention_reference(
            query, keys, cache.values[layer], keep[:, None].expand(-1, keys.shape[1], -1, -1), self.scales[layer],
            query_valid=real, query_positions=step.positions, slot_positions=self.positions[layer], tau=self.tau[0],
            noise=self.noise, seed=self.seed, layer=layer, softcap=self.softcaps[layer])
        return contribution

    def _evict(self, cache, last: torch.Tensor) -> None:
        valid = cache.mask.bool()
        kept: list[torch.Tensor] = []
        dropped = 0
        for layer in range(len(cache.keys)):
            live = valid[:, None, :].expand_as(self.positions[layer])
            rank = self.scores[layer] if self.score == "accumulated" else self.positions[layer].float()
            victims = choose_victims(live, self.positions[layer], rank, self.budgets, last, self.sinks,
                                     self.recent_ratio)
            kept.append(live if victims is None else live & ~victims)
            dropped += 0 if victims is None else int(victims.sum())
        self.evicted += dropped
        if not dropped:
            return
        counts = torch.stack([k.sum(-1) for k in kept])  # [L, B, Hkv]
        if not (counts == counts[:1, :, :1]).all():
            raise TokenpassError(f"{self.name}: heads of a row keep different numbers of slots, which the explicit "
                                 "cache's mask cannot express; run the method on the runtime cache (lower=True)")
        self._compact(cache, kept, counts[0, :, 0])

    def _compact(self, cache, kept: list[torch.Tensor], counts: torch.Tensor) -> None:
        """Gather each head's kept slots, in order, to the right of a ``max(counts)``-slot cache."""
        n = int(counts.max())
        for layer, keep in enumerate(kept):
            order = torch.sort(keep.to(torch.int8), dim=-1, stable=True).indices[..., -n:]  # dead first, then kept
            rows = order[..., None].expand(-1, -1, -1, cache.keys[layer].shape[-1])
            cache.keys[layer] = cache.keys[layer].gather(2, rows)
            cache.values[layer] = cache.values[layer].gather(2, rows)
            self.positions[layer] = self.positions[layer].gather(2, order)
            self.scores[layer] = self.scores[layer].gather(2, order)
        slots = torch.arange(n, device=counts.device)
        cache.mask = (slots >= n - counts[:, None]).to(cache.mask.dtype)
