"""Extra outputs of a captured step: per-layer tensors a method's run-time policy reads after the step.

A step returns ``(logits, present_keys[L], present_values[L])``. A method whose policy needs something the
graph computes (an eviction method's per-slot scores) appends a *group*: one tensor per layer, returned
after the caches, so the explicit-cache session and an ONNX export (outputs ``<group>_<l>``) hand it to
the policy without the graph knowing about policies. The program's signature (output specs and the
output pytree that ``ExportedProgram.module()`` unflattens with) is kept in step with the graph.

Before / after (group ``kv_scores``)::

    return (logits, [k_0, ..], [v_0, ..])
    return (logits, [k_0, ..], [v_0, ..], [s_0, ..])
"""

from __future__ import annotations

import torch
from torch import fx
from torch.export.graph_signature import OutputKind, OutputSpec, TensorArgument
from torch.utils import _pytree as pytree

from tokenpass.errors import TokenpassError


def append_output_group(program: torch.export.ExportedProgram, nodes: list[fx.Node]) -> None:
    """Return ``nodes`` as one more list after the step's outputs."""
    graph = program.graph_module.graph
    (out,) = [n for n in graph.nodes if n.op == "output"]
    root = [entry for entry in program.module_call_graph if entry.fqn == ""]
    if not root or root[0].signature is None:
        raise TokenpassError("only a captured step (a program with its call signature) can gain outputs")
    signature = root[0].signature
    if signature.out_spec.type is not tuple:
        raise TokenpassError(f"the step returns a {signature.out_spec.type.__name__}, expected a tuple")
    out.args = (tuple(out.args[0]) + tuple(nodes),)
    # the output node's arguments and the output specs are in the same order: both grow at the end
    program.graph_signature.output_specs.extend(OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(n.name), None)
                                                for n in nodes)
    leaf = pytree.tree_structure(0)
    group = pytree.TreeSpec(list, None, [leaf] * len(nodes))
    signature.out_spec = pytree.TreeSpec(tuple, None, [*signature.out_spec.children(), group])
