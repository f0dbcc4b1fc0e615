"""Remove operations that do nothing at run time (after vLLM's ``noop_elimination``).

``torch.export`` keeps every dtype assertion and same-dtype cast HF code performs: SmolLM2's prefill step
holds 129 ``_assert_tensor_metadata`` and 125 ``to(float32)`` of float32 tensors. Asserts count as side
effects, so ``dce`` keeps them and, through them, whatever they check (e.g. the attention-mask code).

Before::

    y = aten.to.dtype(x, torch.float32)             # x is already float32
    aten._assert_tensor_metadata(y, dtype=torch.float32)
    z = aten.slice.Tensor(y, 0, 0, 9223372036854775807)
    w = aten.mul.Tensor(z, weight)

After::

    w = aten.mul.Tensor(x, weight)
"""

from __future__ import annotations

import torch
from torch import fx

from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.sites import is_full_slice, tensor_meta
from tokenpass.passes.base import Pass, PassResult
from tokenpass.passes.registry import register

aten = torch.ops.aten


def _same_dtype_cast(node: fx.Node) -> bool:
    if node.target != aten.to.dtype or node.kwargs:
        return False
    source = tensor_meta(node.args[0])
    return source is not None and len(node.args) == 2 and source.dtype == node.args[1]


@register
class EliminateNoops(Pass):
    name = "eliminate_noops"
    exact = True
    invalidates = frozenset({"dead_code_free"})

    def run(self, graph: TokenGraph) -> PassResult:
        result = PassResult(self.name, graph)
        for node in list(graph.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target == aten._assert_tensor_metadata.default:
                graph.graph.erase_node(node)
                result.counts["dtype_asserts_removed"] += 1
            elif _same_dtype_cast(node):
                node.replace_all_uses_with(node.args[0])
                graph.graph.erase_node(node)
                result.counts["same_dtype_casts_removed"] += 1
            elif node.target == aten.slice.Tensor and is_full_slice(node) and not _is_output(node):
                node.replace_all_uses_with(node.args[0])
                graph.graph.erase_node(node)
                result.counts["full_slices_removed"] += 1
        result.modified = bool(result.counts)
        return result


def _is_output(node: fx.Node) -> bool:
    return any(user.op == "output" for user in node.users)
