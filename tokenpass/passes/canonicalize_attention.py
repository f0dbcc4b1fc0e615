"""Rewrite every attention site into the one ``tokenpass::attention`` op that method passes target.

Before (HF LLaMA-style decode step, 9 query heads, 3 KV heads; GPT-2 lacks only the repeat)::

    k = aten.cat([past_keys_0, k_rope], -2)                     # cache update, also returned
    k_rep = aten.reshape(aten.expand(aten.unsqueeze(k, 2), ...))  # repeat_kv: 3 -> 9 heads
    v_rep = ... same for v ...
    out = aten.scaled_dot_product_attention(q, k_rep, v_rep, mask, scale=0.125)

After::

    out = tokenpass.attention(q, k, v, mask, 0.125, False, 0)     # k, v keep 3 heads; layer 0

The head repetition is now dead; ``dce`` removes it. The rewrite is exact: the op's reference
implementation repeats heads the same way, so outputs are bit-identical.

Eager attention (``attn_implementation="eager"``; Gemma 2 with its logit soft-cap), recognised by
``tokenpass.passes.eager_attention``, is rewritten the same way. Before::

    w = aten.matmul(q, aten.transpose(k_rep, 2, 3))
    w = aten.mul(aten.tanh(aten.div(aten.mul(w, 0.0625), 50.0)), 50.0)
    p = aten.dropout(aten.to(aten.softmax(aten.add(w, mask), -1, torch.float32), torch.float32), 0.0, False)
    out = aten.matmul(p, v_rep)

After::

    out = tokenpass.attention(q, k, v, mask, 0.0625, False, 0, 50.0)   # softcap 50.0; None without one

Bit-identical as well: the op's reference computes soft-capped or additively masked attention (what HF's
eager path builds) with HF's eager formula, op for op. An unmasked, uncapped eager site runs SDPA there,
equal up to float rounding. The chain the rewrite leaves dead is erased with it.
"""

from __future__ import annotations

import torch
from torch import fx

from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.op_registry import lookup_attention
from tokenpass.ir.ops import attention_op
from tokenpass.ir.sites import SDPA, AttentionSite, enclosing_layer, tensor_meta
from tokenpass.passes.base import Miss, Pass, PassResult
from tokenpass.passes.eager_attention import EagerAttention, match_eager_attention
from tokenpass.passes.registry import register
from tokenpass.passes.rewrite import replace_node

NO_ATTENTION = (
    "no attention in the graph: no aten.scaled_dot_product_attention or tokenpass.attention node, and no "
    "matmul -> softmax -> matmul chain recognisable as attention; load the model with "
    "attn_implementation='sdpa' or 'eager'"
)
ASSERT_METADATA = torch.ops.aten._assert_tensor_metadata.default


def attention_softcap(node: fx.Node) -> float | None:
    """The soft-cap of a ``tokenpass.attention`` node (``None``: none), read by its registered role."""
    return lookup_attention(node).arg(node, "softcap")


def check_site(site: AttentionSite, node: fx.Node) -> Miss | None:
    """The first reason ``site`` cannot be canonicalised exactly, or ``None``."""
    args = list(node.args) + [None] * 8
    dropout = node.kwargs.get("dropout_p", args[4]) or 0.0
    if dropout:
        return Miss(site.label, "dropout_p == 0", f"dropout_p={dropout}; capture the model in eval mode")
    if site.num_heads < 1 or site.num_kv_heads < 1 or site.head_dim < 1:
        return Miss(site.label, "shapes known", "query/key shapes are missing from the node metadata")
    if site.num_heads % site.num_kv_heads:
        return Miss(
            site.label, "query heads divisible by KV heads", f"{site.num_heads} query vs {site.num_kv_heads} KV heads"
        )
    if site.scale != site.scale:  # NaN: no scale and no head dim to derive it from
        return Miss(site.label, "scale known", "the attention scale could not be determined")
    return None


def erase_dead_chain(graph: TokenGraph, chain: tuple[fx.Node, ...]) -> None:
    """Erase, last first, the nodes of a replaced chain that nothing else uses.

    ``dce`` cannot do this: fx counts the chain's dtype assertions and its ``dropout`` (even p=0) as side
    effects, which would keep the scores, softmax and head repetition computing for nothing. A node with
    users outside the chain would be kept (the matcher admits none: it requires each step used once).
    """
    for node in reversed(chain):
        checks = [u for u in node.users if u.op == "call_function" and u.target == ASSERT_METADATA]
        if len(checks) == len(node.users):
            for check in checks:
                graph.graph.erase_node(check)
            graph.graph.erase_node(node)


@register
class CanonicalizeAttention(Pass):
    name = "canonicalize_attention"
    exact = True
    provides = frozenset({"attention_canonical"})
    invalidates = frozenset({"dead_code_free"})

    def run(self, graph: TokenGraph) -> PassResult:
        result = PassResult(self.name, graph)
        sites = graph.sites().attention  # read before any rewrite: the cached view goes stale after one
        eager, eager_misses = match_eager_attention(graph.graph)
        result.misses.extend(eager_misses)
        if not sites and not eager:
            result.applicable = False
            result.misses.append(Miss(graph.label, "attention op present", NO_ATTENTION))
            return result
        for order, match in enumerate(eager):
            self._rewrite_eager(graph, match, order, result)
        for site in sites:
            node = graph.node(site.node)
            if node.target != SDPA:  # tokenpass.attention, or an op lowered from it
                result.counts["already_canonical"] += 1
                continue
            miss = check_site(site, node)
            if miss is not None:
                result.misses.append(miss)
                continue
            new = replace_node(
                graph,
                node,
                attention_op,
                (
                    graph.node(site.query),
                    graph.node(site.key),
                    graph.node(site.value),
                    graph.node(site.mask) if site.mask else None,
                    site.scale,
                    site.is_causal,
                    site.layer,
                ),
                self.name,
            )
            result.replaced[node.name] = new.name
            result.counts["sdpa_to_tokenpass_attention"] += 1
            if site.num_kv_heads < site.num_heads:
                result.counts["gqa_head_repeat_folded"] += 1
        result.modified = bool(result.replaced)
        return result

    def ensures(self, graph: TokenGraph) -> list[Miss]:
        """Canonical means *all* attention is canonical: an eager chain left unrecognised (say, one with
        attention sinks) still reads the explicit past, so no later pass may treat the graph as canonical."""
        left, misses = match_eager_attention(graph.graph)
        unrewritten = [Miss(f"{m.output.name}", "eager attention rewritten", "a matched chain is still in the graph")
                       for m in left]
        return misses + unrewritten or ([] if graph.sites().attention else [Miss(graph.label, "attention op present",
                                                                                  NO_ATTENTION)])

    def _rewrite_eager(self, graph: TokenGraph, match: EagerAttention, order: int, result: PassResult) -> None:
        """Replace the final ``matmul(probs, v)`` with the canonical op and erase the chain it made dead."""
        node = match.output
        layer = enclosing_layer(node)
        index = layer[0] if layer else order
        args = (match.query, match.key, match.value, match.mask, match.scale, False, index)
        new = replace_node(graph, node, attention_op, args + ((match.softcap,) if match.softcap is not None else ()),
                           self.name)
        result.replaced[node.name] = new.name
        erase_dead_chain(graph, (match.scores, *match.chain))
        result.counts["eager_to_tokenpass_attention"] += 1
        if match.softcap is not None:
            result.counts["softcap_attention"] += 1
        if tensor_meta(match.key).shape[1] < tensor_meta(match.query).shape[1]:
            result.counts["gqa_head_repeat_folded"] += 1
