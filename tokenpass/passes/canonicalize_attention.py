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
"""

from __future__ import annotations

from torch import fx

from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.ops import attention_op
from tokenpass.ir.sites import SDPA, AttentionSite
from tokenpass.passes.base import Miss, Pass, PassResult
from tokenpass.passes.registry import register
from tokenpass.passes.rewrite import replace_node

NO_ATTENTION = (
    "no aten.scaled_dot_product_attention or tokenpass.attention node in the graph: the model computes "
    "attention another way (eager matmul/softmax?); load it with attn_implementation='sdpa'"
)


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


@register
class CanonicalizeAttention(Pass):
    name = "canonicalize_attention"
    exact = True
    provides = frozenset({"attention_canonical"})
    invalidates = frozenset({"dead_code_free"})

    def run(self, graph: TokenGraph) -> PassResult:
        result = PassResult(self.name, graph)
        sites = graph.sites().attention
        if not sites:
            result.applicable = False
            result.misses.append(Miss(graph.label, "attention op present", NO_ATTENTION))
            return result
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
