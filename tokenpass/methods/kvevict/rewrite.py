"""The base of KV-eviction passes: a method is a small dataclass whose fields are its options.

What a subclass says: whether it scores slots (then every cache-attention site becomes
``scored_attention`` with the subclass's noise and temperature arguments, and the cache keeps the
``SCORES`` state) and the options of the ``kvevict`` policy that evicts after each step. The base owns
score -> lowest -> evict; Keyformer, H2O and StreamingLLM are a few lines each on top of it.

Before (both phases, after ``lower_kv_cache``)::

    out_l = tokenpass.cached_attention(q_l, k_l, v_l, scale, l)

After (a scoring method)::

    out_l = tokenpass.scored_attention(q_l, k_l, v_l, scale, l, softcap, window, noise, tau_init, tau_end, ...)
    graph.slot_states += SlotState("kvevict.scores", layers=all)     # accumulated per slot
    graph.policies += PolicySpec("kvevict", budget=..., recent_ratio=..., sinks=..., score=...)

A method that does not score (StreamingLLM) leaves the graph's ops alone and only declares the policy.

Explicit cache (a graph not lowered, e.g. for ``export_onnx``): attention over ``cat(past, new)`` becomes
``explicit_scored_attention``, whose scores the step returns as the output group ``kv_scores``; the
``kvevict.explicit`` policy keeps positions and scores beside the explicit cache and compacts it (with
Keyformer's noise, a prompt step returns its queries as ``kv_queries`` and the policy scores it)::

    out_l, s_l = tokenpass.explicit_scored_attention(q_l, cat(past_k_l, k_l), cat(past_v_l, v_l), mask, ...)
    return (logits, keys, values, [s_0, ..])
    graph.policies += PolicySpec("kvevict.explicit", budget=..., ..., tau_init=..., seed=...)

Prefill attends fully; the first eviction follows it, then one after every decode step, so the cache
never holds more than the budget plus the step's own token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tokenpass.errors import PassError
from tokenpass.ir.capture import STEP_ARGS
from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.sites import AttentionSite
from tokenpass.ir.requests import PolicySpec, SlotState
from tokenpass.methods.kvevict.budget import check_budget, check_ratio
from tokenpass.methods.kvevict.explicit_ops import explicit_scored_attention_op
from tokenpass.methods.kvevict.explicit_policy import EXPLICIT_POLICY, QUERIES_OUTPUT, SCORES_OUTPUT
from tokenpass.methods.kvevict.ops import SCORES, scored_attention_op
from tokenpass.methods.kvevict.policy import POLICY
from tokenpass.passes.base import Miss, Pass, PassResult
from tokenpass.passes.explicit_cache import EXPLICIT, cache_form, site_window
from tokenpass.passes.rewrite import replace_node, replace_with_pair


@dataclass(repr=True)
class KVEviction(Pass):
    """Subclasses are dataclasses (their fields come after these two); they set ``scores`` and override
    ``policy_options`` / ``score_options``.

    ``evict_interval``: decode steps between evictions (1: every step, the papers' rule). A larger value
    lets a sequence hold up to ``kv_budget + evict_interval - 1`` slots between evictions (still bounded)
    and spreads eviction's fixed per-layer cost over that many steps."""

    exact: ClassVar[bool] = False
    requires: ClassVar[frozenset[str]] = frozenset({"attention_canonical"})
    provides: ClassVar[frozenset[str]] = frozenset({"kv_eviction"})
    phases: ClassVar[tuple[str, ...]] = ("prefill", "decode")
    scores: ClassVar[bool] = True  # rank slots by the scored op's accumulated score (else by position)

    kv_budget: int | float = 0.6
    evict_interval: int = 1

    def validate(self) -> None:
        check_budget(self.name, self.kv_budget)
        if self.evict_interval < 1:
            raise PassError(f"{self.name}: evict_interval must be a positive number of decode steps, "
                            f"got {self.evict_interval!r}")
        if hasattr(self, "recent_ratio"):
            check_ratio(self.name, "recent_ratio", self.recent_ratio)

    def policy_options(self) -> dict[str, object]:
        """The ``kvevict`` policy's options (budget, recent window, sinks, what to rank by)."""
        return {"budget": self.kv_budget, "score": "accumulated" if self.scores else "position",
                "interval": self.evict_interval}

    def score_options(self) -> tuple:
        """``scored_attention``'s trailing arguments: noise, tau_init, tau_end, tau_horizon, seed."""
        return (False, 1.0, 1.0, 0, 0)

    def run(self, graph: TokenGraph) -> PassResult:
        result = PassResult(self.name, graph)
        if any(policy.name in (POLICY, EXPLICIT_POLICY) for policy in graph.policies):
            result.counts["already_applied"] = 1
            return result
        sites = graph.sites().attention
        form, result.misses = cache_form(graph, sites)
        if not sites:
            result.misses = [Miss(graph.label, "attention sites", "the graph has no attention to evict keys from")]
        if form == EXPLICIT and not result.misses:
            result.misses = self.explicit_misses(graph, sites)
        if result.misses:  # all or nothing: a layer left unscored would be ranked by a zero score
            result.applicable = False
            return result
        if form == EXPLICIT:
            self._rewrite_explicit(graph, sites, result)
        else:
            self._rewrite_runtime(graph, sites, result)
        result.counts["scored_layers" if self.scores else "evicting_layers"] = len(sites)
        result.modified = True
        return result

    def explicit_misses(self, graph: TokenGraph, sites: list[AttentionSite]) -> list[Miss]:
        """Why the explicit cache cannot carry this method (none: it can)."""
        windows = {s.layer: site_window(graph, s) for s in sites}
        return [Miss(s.label, "a full-attention layer (explicit cache)", f"sliding window of {windows[s.layer]}: "
                     "its mask counts slots as positions, which compaction moves; lower the graph (lower=True)")
                for s in sites if windows[s.layer]]

    def _rewrite_runtime(self, graph: TokenGraph, sites: list[AttentionSite], result: PassResult) -> None:
        if self.scores:
            for site in sites:
                node = graph.node(site.node)
                args = (graph.node(site.query), graph.node(site.key), graph.node(site.value), site.scale, site.layer,
                        site.softcap, site.window or 0, *self.score_options())
                result.replaced[node.name] = replace_node(graph, node, scored_attention_op, args, self.name).name
            graph.declare_slot_state(SlotState(SCORES, layers=tuple(s.layer for s in sites), dtype="float32"))
        graph.add_policy(PolicySpec.of(POLICY, **self.policy_options()))

    def _rewrite_explicit(self, graph: TokenGraph, sites: list[AttentionSite], result: PassResult) -> None:
        """Scored attention over ``cat(past, new)``; its scores become the step's ``kv_scores`` outputs, which
        the explicit eviction policy accumulates and evicts by (``explicit_policy.py``). With Gumbel noise,
        a prompt step returns its queries (``kv_queries``) instead: the noise is drawn from each key's
        position, which only the policy knows, so the policy scores the prompt itself."""
        options = self.policy_options()
        sites = sorted(sites, key=lambda s: s.layer)
        if self.scores:
            noise, tau_init, tau_end, tau_horizon, seed = self.score_options()
            options.update(noise=noise, tau_init=tau_init, tau_end=tau_end, tau_horizon=tau_horizon, seed=seed)
            if noise:  # the same options on both steps: one policy for the session
                options.update(scales=tuple(s.scale for s in sites), softcaps=tuple(s.softcap for s in sites))
            if noise and graph.phase != "decode":
                graph.add_output_group(QUERIES_OUTPUT, [graph.node(s.query) for s in sites])
            else:
                self._score_explicit(graph, sites, result, tau_init)
        result.counts["explicit_cache"] = 1
        graph.add_policy(PolicySpec.of(EXPLICIT_POLICY, **options))

    def _score_explicit(self, graph: TokenGraph, sites: list[AttentionSite], result: PassResult,
                        tau_init: float) -> None:
        token_mask = graph.node(graph.program.graph_signature.user_inputs[STEP_ARGS.index("attention_mask")])
        scores = []
        for site in sites:
            node = graph.node(site.node)
            args = (graph.node(site.query), graph.node(site.key), graph.node(site.value),
                    graph.node(site.mask) if site.mask else None, token_mask, site.scale, site.layer,
                    site.softcap, graph.phase != "decode", tau_init)
            out, score = replace_with_pair(graph, node, explicit_scored_attention_op, args, self.name)
            result.replaced[node.name] = out.name
            scores.append(score)
        graph.add_output_group(SCORES_OUTPUT, scores)

    def ensures(self, graph: TokenGraph) -> list[Miss]:
        if any(policy.name in (POLICY, EXPLICIT_POLICY) for policy in graph.policies):
            return []
        return [Miss(graph.label, "eviction policy declared", "no eviction policy on the graph")]


