"""The ``cutcrossentropy`` pass: the LM head and its cross-entropy become one op, so training never holds
the ``[tokens, vocab]`` logits.

Before (the training step HF models compute, see ``match.py``)::

    logits = aten.linear(hidden, lm_head_weight)                         # [B, T, V]
    loss = aten.cross_entropy_loss(aten.view(aten.to(logits, f32), [-1, V]), shifted_labels)
    return (loss, logits)

After::

    rows = aten.reshape(hidden, [-1, D])                                 # the logits' row ops, on hidden
    loss = getitem(tokenpass.linear_cross_entropy_fused(rows, lm_head_weight, shifted_labels, ...), 0)
    return (loss, None)

The logits are a model output, which training loops do not read: ``drop_logits=True`` (the default)
returns None in their place, ``drop_logits=False`` leaves a graph that returns them untouched and says
so. Logits that anything else reads (a z-loss on logits, a metric) always leave the graph alone, with
the reader named.

The pass is exact: the fused op computes the same loss (fp32 accumulation, as the loss's upcast does)
and, with ``filter_eps=None``, the same gradients; the default ``"auto"`` filter skips gradient blocks
below the dtype's precision (``finfo.eps / 32``) in the recomputing backward.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import fx
from torch.export.graph_signature import ConstantArgument

from tokenpass.errors import PassError
from tokenpass.ir.capture_train import TRAIN
from tokenpass.ir.graph import TokenGraph
from tokenpass.kernels.linear_cross_entropy_ref import fused_pays_off, resolve_filter_eps
from tokenpass.methods.cutcrossentropy.match import CHECKS, HeadLoss, NoMatch, loss_nodes, match_head_loss, replay_rows
from tokenpass.methods.cutcrossentropy.ops import linear_cross_entropy_fused_overload, linear_cross_entropy_op_overload
from tokenpass.passes.base import Miss, Pass, PassResult
from tokenpass.passes.registry import register

FUSED_OPS = (linear_cross_entropy_fused_overload, linear_cross_entropy_op_overload)


@register
@dataclass(repr=True)
class CutCrossEntropy(Pass):
    """Options: ``drop_logits`` (return None for logits the loss alone reads); ``filter_eps`` (``"auto"``,
    a threshold, or None for exact gradients; the recomputing backward only); ``implementation``:
    ``"fused"`` computes the gradients with the loss (fastest on the CPU, scalar losses only),
    ``"recompute"`` is the paper's forward + recomputing backward (Triton kernels on CUDA), ``"auto"``
    picks fused on the CPU where it pays off and recompute elsewhere."""

    name: ClassVar[str] = "cutcrossentropy"
    exact: ClassVar[bool] = True
    phases: ClassVar[tuple[str, ...]] = (TRAIN,)

    drop_logits: bool = True
    filter_eps: float | Literal["auto"] | None = "auto"
    implementation: Literal["auto", "fused", "recompute"] = "auto"

    def validate(self) -> None:
        if isinstance(self.filter_eps, float) and not 0 <= self.filter_eps < 1:
            raise PassError(f"cutcrossentropy: filter_eps must be in [0, 1), 'auto' or None, got {self.filter_eps!r}")

    def run(self, graph: TokenGraph) -> PassResult:
        result = PassResult(self.name, graph)
        losses = loss_nodes(graph.graph)
        if not losses:
            fused = [n for n in graph.graph.nodes if n.op == "call_function" and n.target in FUSED_OPS]
            if fused:
                result.counts["already_fused"] = len(fused)
            else:
                result.applicable = False
                result.misses.append(Miss(graph.label, "cross-entropy present",
                                          "the graph computes no aten.cross_entropy_loss (was it captured with labels?)"))
            return result
        for loss in losses:
            try:
                match = match_head_loss(loss)
                self.check_outputs(match)
            except NoMatch as miss:
                result.misses.append(Miss(loss.name, miss.check, miss.reason))
                continue
            new = self.fuse(graph, match)
            result.replaced[loss.name] = new.name
            result.counts["fused_losses"] += 1
            result.counts["dropped_logit_outputs"] += len(match.logit_outputs)
            result.modified = True
        result.applicable = result.modified
        return result

    def check_outputs(self, match: HeadLoss) -> None:
        if match.logit_outputs and not self.drop_logits:
            raise NoMatch("logits not returned", f"the graph returns the logits ({match.logit_outputs[0].name}) "
                          "and drop_logits=False")

    def fuse(self, graph: TokenGraph, match: HeadLoss) -> fx.Node:
        """Insert the fused op before the loss, move the loss's users to it, drop the logits chain."""
        g = graph.graph
        dtype = match.hidden.meta["val"].dtype
        fused = self.use_fused(match, graph)
        with g.inserting_before(match.loss):
            rows = replay_rows(g, match, match.hidden)
            common = (rows, match.weight, match.targets, match.bias, match.ignore_index, match.softcap,
                      match.reduction, 0)
            if fused:
                call = g.call_function(linear_cross_entropy_fused_overload, common)
            else:
                call = g.call_function(linear_cross_entropy_op_overload,
                                       (*common, resolve_filter_eps(self.filter_eps, dtype)))
            loss = g.call_function(operator.getitem, (call, 0))
        loss.meta.update({key: match.loss.meta[key] for key in ("val", "nn_module_stack", "stack_trace")
                          if key in match.loss.meta})
        for node in (*replayed(rows, match.hidden), call, loss):
            node.meta["tokenpass"] = {"pass": self.name, "replaces": match.loss.name}
        match.loss.replace_all_uses_with(loss)
        drop_outputs(graph, match.logit_outputs)
        erase_chain(g, [*match.chain, match.loss])
        return call

    def use_fused(self, match: HeadLoss, graph: TokenGraph) -> bool:
        if self.implementation != "auto":
            return self.implementation == "fused" and match.reduction != "none"
        device = graph.spec.device if graph.spec is not None else torch.device("cpu")
        vocab = match.weight.meta["val"].shape[0]
        return device.type == "cpu" and match.reduction != "none" and fused_pays_off(vocab)


def replayed(rows: fx.Node, hidden: fx.Node) -> list[fx.Node]:
    """The row ops ``replay_rows`` put between ``hidden`` and ``rows``."""
    nodes = []
    while rows is not hidden:
        nodes.append(rows)
        rows = rows.args[0]
    return nodes


def drop_outputs(graph: TokenGraph, nodes: list[fx.Node]) -> None:
    """Return None where the graph returned ``nodes``, in the graph and in the program's signature."""
    (output,) = [n for n in graph.graph.nodes if n.op == "output"]
    names = {node.name for node in nodes}
    for node in nodes:
        output.replace_input_with(node, None)  # type: ignore[arg-type]
    for spec in graph.program.graph_signature.output_specs:
        if getattr(spec.arg, "name", None) in names:
            spec.arg = ConstantArgument(name="", value=None)


def erase_chain(graph: fx.Graph, chain: list[fx.Node]) -> None:
    """Erase the nodes from the head to the old loss (loss side first), with their metadata checks."""
    for node in reversed(chain):
        for user in list(node.users):
            if user.op == "call_function" and user.target in CHECKS:
                graph.erase_node(user)
        if not node.users:
            graph.erase_node(node)
