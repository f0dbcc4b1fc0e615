"""TokenSelect: each decode step attends to the first tokens, the top-k soft-voted ones and the recent ones.

Nothing is evicted (memory does not fall); each step reads fewer keys and values. Per layer and
sequence, candidates are the slots between the first ``n_init`` and the last ``n_local`` positions;
every query head scores them (``q . k`` times the layer's scale), the heads vote with their softmax
probabilities, and the ``top_k`` best are read with the fixed ones. The selection cache reuses a
layer's last selection while the new query's cosine similarity to the query that made it is at least
``theta`` (``theta=None``: always select); the cache notes count lookups and hits.

Before (decode, after ``lower_kv_cache``)::

    out_l = tokenpass.cached_attention(q_l, k_l, v_l, scale, l)

After::

    out_l = tokenpass.token_select_attention(q_l, k_l, v_l, scale, l, n_init, n_local, top_k, theta)

Explicit cache (a graph not lowered, e.g. for ``export_onnx``): with ``theta=None`` (no selection cache,
so no state between steps) the same rewrite goes onto ``tokenpass.explicit_token_select_attention``,
which reads ``cat(past, new)`` keys/values and the model's mask (``passes/explicit_cache.py``)::

    out_l = tokenpass.explicit_token_select_attention(q_l, cat(past_k_l, k_l), cat(past_v_l, v_l), mask, ...)

Sliding-window layers stay windowed-dense (a window already bounds what they read).

Positions: ``positions="original"`` (default) keeps every key at the position it was written at.
``positions="contiguous"`` is the paper's convention: the keys a step reads are rotated again to
consecutive positions ending at the query's, so no distance exceeds ``n_init + top_k + n_local`` (its
length-extrapolation claim). The rotation's frequencies are read from the graph (``ir.rotary``), so
it needs rotary keys and the runtime cache; the vote still scores keys at their original positions::

    out_l = tokenpass.token_select_attention(q_l, k_l, v_l, scale, l, n_init, n_local, top_k, theta,
                                             softcap, inv_freq, rot_dim)

Defaults are scaled to a small model: n_init 4, n_local 128, top_k 512.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from tokenpass.errors import PassError
from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.rotary import Rotary, key_rotary
from tokenpass.ir.sites import AttentionSite
from tokenpass.methods.tokenselect.explicit_ops import explicit_token_select_op
from tokenpass.methods.tokenselect.ops import token_select_attention_op
from tokenpass.passes.base import Miss, Pass, PassResult
from tokenpass.passes.explicit_cache import EXPLICIT, cache_form, site_window
from tokenpass.passes.registry import register
from tokenpass.passes.rewrite import replace_node

NEVER = 2.0  # a cosine threshold no query reaches: the selection cache off
SELECTING_OPS = (token_select_attention_op, explicit_token_select_op)


@register
@dataclass(repr=True)
class TokenSelect(Pass):
    name: ClassVar[str] = "tokenselect"
    exact: ClassVar[bool] = False
    requires: ClassVar[frozenset[str]] = frozenset({"attention_canonical"})
    provides: ClassVar[frozenset[str]] = frozenset({"token_selection"})
    phases: ClassVar[tuple[str, ...]] = ("decode",)

    top_k: int = 512
    n_init: int = 4
    n_local: int = 128
    theta: float | None = 0.9
    positions: Literal["original", "contiguous"] = "original"

    def validate(self) -> None:
        if self.top_k < 1:
            raise PassError(f"tokenselect: top_k must be a positive integer, got {self.top_k!r}")
        if self.n_init < 0:
            raise PassError(f"tokenselect: n_init must be a non-negative integer, got {self.n_init!r}")
        if self.n_local < 1:
            raise PassError(f"tokenselect: n_local must be at least 1 (the step's own token), got {self.n_local!r}")
        if self.theta is not None and not 0 <= self.theta <= 1:
            raise PassError(f"tokenselect: theta must be in [0, 1] (a cosine similarity) or None, got {self.theta!r}")

    def run(self, graph: TokenGraph) -> PassResult:
        result = PassResult(self.name, graph)
        sites = graph.sites().attention
        if any(graph.node(s.node).target in SELECTING_OPS for s in sites):
            result.counts["already_applied"] = 1
            return result
        form, result.misses = cache_form(graph, sites)
        if form == EXPLICIT and self.theta is not None and not result.misses:
            result.misses = [Miss(graph.label, "the runtime KV cache", f"theta={self.theta} reuses selections kept "
                                  "in the runtime's cache between steps; lower the graph (lower=True) or pass "
                                  "theta=None")]
        if not sites:
            result.misses = [Miss(graph.label, "attention sites", "the graph has no attention to select keys for")]
        rotations = {} if result.misses else self._rotations(graph, sites, form, result)
        if result.misses:
            result.applicable = False
            return result
        theta = NEVER if self.theta is None else self.theta
        for site in sites:
            if site_window(graph, site):
                result.counts["windowed_dense_layers"] += 1
                continue
            node = graph.node(site.node)
            inputs = (graph.node(site.query), graph.node(site.key), graph.node(site.value))
            if form == EXPLICIT:
                op, args = explicit_token_select_op, (*inputs, graph.node(site.mask) if site.mask else None,
                                                      site.scale, site.layer, self.n_init, self.n_local, self.top_k,
                                                      site.softcap)
            else:
                op, args = token_select_attention_op, (*inputs, site.scale, site.layer, self.n_init, self.n_local,
                                                       self.top_k, theta, site.softcap)
                if site.node in rotations:
                    rotary = rotations[site.node]
                    args = (*args, graph.node(rotary.inv_freq), rotary.rot_dim)
                    result.counts["repositioned_layers"] += 1
            result.replaced[node.name] = replace_node(graph, node, op, args, self.name).name
            result.counts["selecting_layers"] += 1
        if form == EXPLICIT and result.replaced:  # the runtime cache is the usual case; say when it is not
            result.counts["explicit_cache"] = 1
        result.modified = bool(result.replaced)
        return result

    def _rotations(self, graph: TokenGraph, sites: list[AttentionSite], form: str,
                   result: PassResult) -> dict[str, Rotary]:
        """Each selecting site's key rotation when positions are contiguous; misses name what is lacking."""
        if self.positions == "original":
            return {}
        if form == EXPLICIT:
            result.misses = [Miss(graph.label, "the runtime KV cache", "positions='contiguous' re-rotates keys by "
                                  "the positions the runtime's cache keeps; lower the graph (lower=True)")]
            return {}
        found = {site.node: key_rotary(graph.node(site.key)) for site in sites if not site_window(graph, site)}
        result.misses = [Miss(s.label, "rotary keys (positions='contiguous')", found[s.node]) for s in sites
                         if isinstance(found.get(s.node), str)]
        return {node: rotary for node, rotary in found.items() if isinstance(rotary, Rotary)}

    def ensures(self, graph: TokenGraph) -> list[Miss]:
        if any(graph.node(s.node).target in SELECTING_OPS for s in graph.sites().attention):
            return []
        return [Miss(graph.label, "a selecting layer", "no full-attention layer was rewritten")]
