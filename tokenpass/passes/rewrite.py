"""Graph-editing helpers shared by passes, recording provenance on every node they create."""

from __future__ import annotations

import operator
from typing import Any

from torch import fx

from tokenpass.ir.graph import TokenGraph

_COPIED_META = ("val", "nn_module_stack", "stack_trace", "source_fn_stack", "tensor_meta")


def replace_node(graph: TokenGraph, old: fx.Node, target: Any, args: tuple, pass_name: str) -> fx.Node:
    """Insert ``target(*args)`` in place of ``old``, move its users over and erase it.

    The new node inherits ``old``'s metadata (shape, module path, source line) and records in
    ``meta["tokenpass"]`` which pass made it from which node, so ``tokenpass inspect`` can show provenance.
    """
    with graph.graph.inserting_before(old):
        new = graph.graph.call_function(target, args)
    for key in _COPIED_META:
        if key in old.meta:
            new.meta[key] = old.meta[key]
    new.meta["tokenpass"] = {"pass": pass_name, "replaces": old.name}
    old.replace_all_uses_with(new)
    graph.graph.erase_node(old)
    return new


def replace_with_pair(graph: TokenGraph, old: fx.Node, target: Any, args: tuple,
                      pass_name: str) -> tuple[fx.Node, fx.Node]:
    """Insert ``target(*args)`` (an op returning two tensors) in place of ``old``: ``old``'s users read its
    first element; the second is returned for the caller to wire (both carry provenance)."""
    with graph.graph.inserting_before(old):
        pair = graph.graph.call_function(target, args)
        first = graph.graph.call_function(operator.getitem, (pair, 0))
        second = graph.graph.call_function(operator.getitem, (pair, 1))
    for key in ("nn_module_stack", "stack_trace"):
        if key in old.meta:
            pair.meta[key] = old.meta[key]
    first.meta.update(old.meta)
    for new in (pair, first, second):
        new.meta["tokenpass"] = {"pass": pass_name, "replaces": old.name}
    old.replace_all_uses_with(first)
    graph.graph.erase_node(old)
    return first, second


def replace_output(graph: TokenGraph, old: fx.Node, new: fx.Node) -> None:
    """Make the graph return ``new`` where it returned ``old``, keeping the program's signature in step."""
    (out,) = [n for n in graph.graph.nodes if n.op == "output"]
    out.replace_input_with(old, new)
    for spec in graph.program.graph_signature.output_specs:
        if getattr(spec.arg, "name", None) == old.name:
            spec.arg.name = new.name
