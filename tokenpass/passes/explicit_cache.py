"""Which cache a method rewrites attention on: the runtime's own (a lowered graph) or explicit tensors.

Method passes that can export to ONNX rewrite either form: ``tokenpass.cached_attention`` after
``lower_kv_cache``, or canonical ``tokenpass.attention`` over ``cat(past, new)`` keys/values with the
model's mask (a graph not lowered, as ``export_onnx`` runs them). The explicit form reads slot liveness
off the mask, so it needs what lowering needs: every full-attention layer's cache update found and its
mask computing causal + padding (checked by running it, ``lower_kv_cache.mask_misses``).
"""

from __future__ import annotations

from typing import Literal

from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.ops import attention_op, cached_attention_op
from tokenpass.ir.sites import AttentionSite
from tokenpass.passes.base import Miss
from tokenpass.passes.lower_kv_cache import cache_update_miss, mask_misses

RUNTIME, EXPLICIT = "runtime", "explicit"


def cache_form(graph: TokenGraph, sites: list[AttentionSite]) -> tuple[Literal["runtime", "explicit"], list[Miss]]:
    """The form the sites' attention is in, and why a method cannot rewrite it (no misses: it can)."""
    if not sites:
        return EXPLICIT, [Miss(graph.label, "attention sites", "the graph has no attention")]
    targets = {graph.node(s.node).target for s in sites}
    if targets == {cached_attention_op}:
        return RUNTIME, []
    wrong = [Miss(s.label, "canonical attention or attention on the runtime cache",
                  f"op is {s.op}; run canonicalize_attention (and lower_kv_cache) first")
             for s in sites if graph.node(s.node).target != attention_op]
    if wrong:
        return EXPLICIT, wrong
    full = [s for s in sites if not s.window]
    return EXPLICIT, [m for m in map(cache_update_miss, full) if m] or mask_misses(graph, full)


def site_window(graph: TokenGraph, site: AttentionSite) -> int:
    """The layer's sliding window (0: full attention) on either form: the runtime op carries it as an
    argument; canonical attention over explicit tensors expresses it in its mask only, so the model's
    spec says."""
    return site.window or (graph.spec.window(site.layer) if graph.spec else 0)
