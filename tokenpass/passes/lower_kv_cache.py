"""Lower canonical attention onto the runtime-owned KV cache.

Before (one layer of a captured decode step)::

    k = aten.cat([past_keys_0, k_new], -2)        # copies the whole cache every step; also returned
    v = aten.cat([past_values_0, v_new], -2)
    out = tokenpass.attention(q, k, v, mask, 0.125, False, 0)

After::

    out = tokenpass.cached_attention(q, k_new, v_new, 0.125, 0)   # stages k_new/v_new, reads the cache
    # graph outputs k_new / v_new where it returned k / v; the cats and the mask are dead (dce)

The runtime's cache keeps padding and causality itself (per-slot validity and positions), which is
what lets eviction and selection passes change what attention reads without touching the mask code.
Exact: the runtime runs the lowered step with the original's inputs and reproduces its outputs.
"""

from __future__ import annotations

from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.ops import attention_op, cached_attention_op
from tokenpass.ir.sites import AttentionSite
from tokenpass.passes.base import Miss, Pass, PassResult
from tokenpass.passes.canonicalize_attention import attention_softcap
from tokenpass.passes.registry import register
from tokenpass.passes.rewrite import replace_node, replace_output
from tokenpass.runtime.executor import run_with_explicit_past

SOFTCAP_UNSUPPORTED = "soft-capped attention is not supported by the runtime cache yet"


def _miss(site: AttentionSite) -> Miss | None:
    for name, slot in (("keys", site.key_cache), ("values", site.value_cache)):
        if slot.past is None or slot.present is None:
            return Miss(site.label, f"{name} cache update found", f"{name} are not cat(past input, new) returned by the graph")
    return None


@register
class LowerKVCache(Pass):
    name = "lower_kv_cache"
    exact = True
    requires = frozenset({"attention_canonical"})
    provides = frozenset({"runtime_kv_cache"})
    invalidates = frozenset({"dead_code_free"})

    def run(self, graph: TokenGraph) -> PassResult:
        result = PassResult(self.name, graph)
        window = graph.spec.sliding_window if graph.spec else None
        if window is not None:
            result.applicable = False
            result.misses.append(Miss(graph.label, "full attention", f"sliding-window attention (window {window}) "
                                      "is not supported by the runtime cache yet"))
            return result
        for site in graph.sites().attention:
            node = graph.node(site.node)
            if node.target == cached_attention_op:
                result.counts["already_lowered"] += 1
                continue
            if node.target != attention_op:
                result.misses.append(Miss(site.label, "canonical attention",
                                          f"op is {site.op}; run canonicalize_attention first"))
                continue
            miss = _miss(site)
            if miss is None and attention_softcap(node) is not None:
                miss = Miss(site.label, "no soft-cap", SOFTCAP_UNSUPPORTED)
            if miss is not None:
                result.misses.append(miss)
                continue
            k_new, v_new = graph.node(site.key_cache.new), graph.node(site.value_cache.new)
            replace_output(graph, graph.node(site.key_cache.present), k_new)
            replace_output(graph, graph.node(site.value_cache.present), v_new)
            query = graph.node(site.query)
            new = replace_node(graph, node, cached_attention_op, (query, k_new, v_new, site.scale, site.layer), self.name)
            result.replaced[node.name] = new.name
            result.counts["attention_on_runtime_cache"] += 1
        result.modified = bool(result.replaced)
        if result.modified or result.counts["already_lowered"]:
            graph.runner = run_with_explicit_past
        return result
