"""Compute LM-head logits only for the positions the runtime asks for.

Generation needs the last position's logits, yet the captured prefill step computes them for every
prompt token: at 4096 tokens SmolLM2's LM head alone is a 4096 x 576 x 49152 product (116 GFLOP,
800 MB of logits), more than half of the prefill. After lowering, the step's ``attention_mask`` input
is dead (the runtime cache does the masking), so this pass gives it a new meaning: a ``[B, T]`` 0/1
tensor whose first row marks the positions to compute logits for (keeping the mask's shape keeps
every shape guard the captured step carries satisfied).

Before::

    logits = aten.linear(final_norm_out, lm_head_weight)             # [B, T, V]

After::

    rows = aten.select(aten.nonzero(aten.select(attention_mask, 0, 0)), 1, 0)   # [K] marked positions
    logits = aten.linear(aten.index_select(final_norm_out, 1, rows), lm_head_weight)  # [B, K, V]

Row-wise elementwise ops between the head and the logits output (final logit soft-capping,
``tanh(logits / c) * c``; a dtype cast) are left after the head: they act on each logit alone, so on the
selected rows they give exactly the selected rows of the full result (``HeadSite.post_ops`` lists them).
"""

from __future__ import annotations

import torch

from tokenpass.ir.graph import TokenGraph
from tokenpass.passes.base import Miss, Pass, PassResult
from tokenpass.passes.registry import register

aten = torch.ops.aten
ROWS_INPUT = "attention_mask"


@register
class SelectLogitRows(Pass):
    name = "select_logit_rows"
    exact = True
    requires = frozenset({"runtime_kv_cache"})
    provides = frozenset({"logit_rows"})

    def run(self, graph: TokenGraph) -> PassResult:
        result = PassResult(self.name, graph)
        if "logit_rows" in graph.properties:
            result.counts["already_selected"] += 1
            return result
        head = graph.sites().lm_head
        if head is None:
            result.applicable = False
            result.misses.append(Miss(graph.label, "LM head found", "no linear produces the logits output "
                                      "(through layout and row-wise elementwise ops)"))
            return result
        rows_input = graph.node(ROWS_INPUT)
        live_users = [u for u in rows_input.users if u.op != "output" and len(u.users) > 0]
        if live_users:
            result.applicable = False
            result.misses.append(Miss(graph.label, f"{ROWS_INPUT} input unused",
                                      f"still read by {live_users[0].name}; run lower_kv_cache and dce first"))
            return result
        linear = graph.node(head.node)
        hidden = linear.args[0]
        with graph.graph.inserting_before(linear):
            first = graph.graph.call_function(aten.select.int, (rows_input, 0, 0))
            marked = graph.graph.call_function(aten.nonzero.default, (first,))
            rows = graph.graph.call_function(aten.select.int, (marked, 1, 0))
            picked = graph.graph.call_function(aten.index_select.default, (hidden, 1, rows))
        for node in (first, marked, rows, picked):
            node.meta["tokenpass"] = {"pass": self.name, "feeds": linear.name}
        linear.replace_input_with(hidden, picked)
        result.counts["lm_head_rows_selected"] = 1
        if head.post_ops:
            result.counts["rowwise_ops_after_head"] = len(head.post_ops)
        result.modified = True
        return result
