"""Lower canonical attention onto the runtime-owned KV cache.

Before (one layer of a captured decode step)::

    k = aten.cat([past_keys_0, k_new], -2)        # copies the whole cache every step; also returned
    v = aten.cat([past_values_0, v_new], -2)
    out = tokenpass.attention(q, k, v, mask, 0.125, False, 0)

After::

    out = tokenpass.cached_attention(q, k_new, v_new, 0.125, 0, softcap=None, window=0)
    # graph outputs k_new / v_new where it returned k / v; the cats and the mask are dead (dce)

The runtime's cache keeps padding, causality and sliding windows itself (per-slot validity and
positions, the op's ``window``), which is what lets eviction and selection passes change what attention
reads without touching the mask code. Dropping the mask is only exact if the mask computes what the
runtime re-derives, so every site's mask is *checked* by running the graph on sample inputs longer
than any window (``ir/masks.py``). Each layer's window comes from the capture's reading of the config.

All or nothing: a graph is lowered only if every site can be; otherwise it is left as captured (and
runs exactly, with its cache as explicit tensors) and the misses say which layer failed and why.
Exact: the runtime runs the lowered step with the original's inputs and reproduces its outputs.
"""

from __future__ import annotations

import torch

from tokenpass.ir.capture import sample_inputs
from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.masks import first_difference, node_values
from tokenpass.ir.op_registry import lookup_attention
from tokenpass.ir.ops import attention_op, cached_attention_op
from tokenpass.ir.sites import AttentionSite
from tokenpass.passes.base import Miss, Pass, PassResult
from tokenpass.passes.registry import register
from tokenpass.passes.rewrite import replace_node, replace_output

PAST_PREFIXES = ("past_keys", "past_values")  # the capture's past-cache inputs (``ir/capture.py``)
MASK_PROBE_PAST = 64  # past length of the mask probe: any window below it is seen, declared or not
MASK_PROBE_MAX = 256  # declared windows up to half this are checked at their edge


def cache_update_miss(site: AttentionSite) -> Miss | None:
    for name, slot in (("keys", site.key_cache), ("values", site.value_cache)):
        if slot.past is None or slot.present is None:
            return Miss(site.label, f"{name} cache update found", f"{name} are not cat(past input, new) returned by the graph")
    return None


def mask_misses(graph: TokenGraph, sites: list[AttentionSite]) -> list[Miss]:
    """Sites whose mask is not causal + padding (+ the layer's window) on sample inputs."""
    spec = graph.spec
    windows = [spec.window(site.layer) for site in sites]
    past = max(MASK_PROBE_PAST, min(2 * max(windows, default=0) + 4, MASK_PROBE_MAX))
    inputs = sample_inputs(spec, graph.phase, past=past)
    new = inputs[0].shape[1]
    masks = node_values(graph.module(), inputs, [site.mask for site in sites if site.mask])
    misses = []
    for site, window in zip(sites, windows):
        if site.mask is None:
            if not site.is_causal and new > 1:
                misses.append(Miss(site.label, "causal attention", "no mask and is_causal=False: bidirectional"))
            continue
        difference = first_difference(masks[site.mask], inputs[1], new, window)
        if difference is not None:
            misses.append(Miss(site.label, "mask is causal + padding" + (f" + window {window}" if window else ""), difference))
    return misses


SIZE_OPS = {torch.ops.aten.sym_size.int, torch.ops.aten.size.default}


def live_past_reads(graph: TokenGraph) -> list[tuple[str, str]]:
    """``(past input, node)`` pairs where a node that feeds an output reads a past-cache input's data."""
    live, todo = set(), [n for n in graph.graph.nodes if n.op == "output"]
    while todo:
        node = todo.pop()
        if node not in live:
            live.add(node)
            todo.extend(node.all_input_nodes)
    pasts = [n for n in graph.graph.nodes if n.op == "placeholder" and n.name.startswith(PAST_PREFIXES)]
    return [(p.name, u.name) for p in pasts for u in p.users
            if u in live and u.op != "output" and u.target not in SIZE_OPS]


@register
class LowerKVCache(Pass):
    name = "lower_kv_cache"
    exact = True
    requires = frozenset({"attention_canonical"})
    provides = frozenset({"runtime_kv_cache"})
    invalidates = frozenset({"dead_code_free"})

    def run(self, graph: TokenGraph) -> PassResult:
        result = PassResult(self.name, graph)
        sites = graph.sites().attention
        todo = [site for site in sites if graph.node(site.node).target != cached_attention_op]
        result.counts["already_lowered"] = len(sites) - len(todo)
        if not sites:
            result.misses.append(Miss(graph.label, "attention sites", "the graph has no attention to lower"))
            return result
        result.misses = self._misses(graph, todo)
        if result.misses:  # all or nothing: a partly lowered graph cannot run on either cache
            return result
        for site in todo:
            self._lower(graph, site, result)
        result.modified = bool(result.replaced)
        return result

    def _misses(self, graph: TokenGraph, sites: list[AttentionSite]) -> list[Miss]:
        misses = []
        for site in sites:
            if graph.node(site.node).target != attention_op:
                misses.append(Miss(site.label, "canonical attention", f"op is {site.op}; run canonicalize_attention first"))
                continue
            miss = cache_update_miss(site)
            if miss is not None:
                misses.append(miss)
        if misses or not sites or graph.spec is None:
            return misses
        return mask_misses(graph, sites)

    def _lower(self, graph: TokenGraph, site: AttentionSite, result: PassResult) -> None:
        node = graph.node(site.node)
        k_new, v_new = graph.node(site.key_cache.new), graph.node(site.value_cache.new)
        replace_output(graph, graph.node(site.key_cache.present), k_new)
        replace_output(graph, graph.node(site.value_cache.present), v_new)
        window = graph.spec.window(site.layer) if graph.spec else 0
        args = (graph.node(site.query), k_new, v_new, site.scale, site.layer, site.softcap, window)
        new = replace_node(graph, node, cached_attention_op, args, self.name)
        result.replaced[node.name] = new.name
        result.counts["attention_on_runtime_cache"] += 1
        if window:
            result.counts["sliding_window_layers"] += 1
        if site.softcap is not None:
            result.counts["softcap_layers"] += 1

    def ensures(self, graph: TokenGraph) -> list[Miss]:
        """Every attention site reads the runtime cache, and nothing live still reads the past-cache inputs
        (which the runtime feeds empty): the check is on the graph, so attention the canonicalisation did
        not recognise cannot slip through."""
        sites = graph.sites().attention
        left = [s for s in sites if not lookup_attention(graph.node(s.node)).reads_runtime_cache]
        if not sites:
            return [Miss(graph.label, "attention on the runtime cache", "the graph has no attention sites")]
        misses = [Miss(s.label, "attention on the runtime cache", f"still {s.op}") for s in left]
        return misses + [Miss(graph.label, "past cache inputs unread", f"{name} is still read by {user}")
                         for name, user in live_past_reads(graph)]
