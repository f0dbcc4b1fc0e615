"""Do two traces of one step compute the same thing? (ops, dataflow and literal arguments, compared)

Capture traces a step at batch 2; when that program guards against batch 1, it traces again at batch 1
and accepts dropping the guard only if both traces compute the same ops on the same data. The traces
legitimately differ in which sizes are symbolic and in no-op views and conversions one of them elides,
so those are normalised away before comparing.
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten


# Ops that return their input unchanged when the output has the input's shape. Tracing records them or
# not depending on whether a size is known statically (``x[:, 0:]`` on a dim of static size 1 is elided).
_NOOP_VIEWS = {
    aten.alias.default,
    aten.slice.Tensor,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.expand.default,
}
# Conversions that do nothing when source and result agree in shape, dtype and device (one trace may
# record them where the other elides them).
_NOOP_CONVERSIONS = {aten.to.device, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default}
_SYMBOLIC = "<size>"


def first_difference(a: fx.Graph, b: fx.Graph) -> str | None:
    """Where two traces of one step differ as computations (ops, dataflow, literal arguments), or None.

    Symbolic sizes match any size (the traces differ in which dims are symbolic); no-op views and
    assertions are ignored.
    """
    ops_a, ops_b = _computation(a), _computation(b)
    for i, (x, y) in enumerate(zip(ops_a, ops_b)):
        if x[0] != y[0]:
            return f"op {i}: {x[0]} vs {y[0]}"
        if not _same_args(x[1], y[1]):
            return f"op {i} ({x[0]}): arguments {x[1]} vs {y[1]}"
    if len(ops_a) != len(ops_b):
        return f"{len(ops_a)} vs {len(ops_b)} ops"
    return None


def _computation(graph: fx.Graph) -> list[tuple[str, object]]:
    """The graph's ops in order as ``(op, args)``: node arguments named by the op index (or input name)
    that produced them, no-op views resolved to their source, symbolic sizes as ``<size>``."""
    keys: dict[fx.Node, object] = {}
    ops: list[tuple[str, object]] = []
    for node in graph.nodes:
        val = node.meta.get("val")
        if node.op in ("placeholder", "get_attr"):
            keys[node] = f"input {node.target}"
        elif node.op == "output":
            ops.append(("output", _normalise(node.args, keys)))
        elif isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            keys[node] = _SYMBOLIC
        elif str(node.target).startswith(("aten._assert", "aten.sym_constrain_range")):
            continue
        elif node.target in _NOOP_VIEWS and _same_shape(node, node.args[0]):
            keys[node] = keys[node.args[0]]
        elif node.target in _NOOP_CONVERSIONS and _same_kind(node, node.args[0]):
            keys[node] = keys[node.args[0]]
        else:
            keys[node] = f"op {len(ops)}"
            ops.append((str(node.target), _normalise((node.args, node.kwargs), keys)))
    return ops


def _same_shape(node: fx.Node, source: object) -> bool:
    """Same shape, where a symbolic dim matches a symbolic dim (a view to ``(B, -1)`` of a ``[B, S]``
    tensor traces as ``[s0, s1]`` to ``[s0, s1 * s0 / s0]``-like expressions)."""
    out = node.meta.get("val")
    inp = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not (isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor)) or out.dim() != inp.dim():
        return False
    return all(str(a) == str(b) or (isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt))
               for a, b in zip(out.shape, inp.shape))


def _same_kind(node: fx.Node, source: object) -> bool:
    out = node.meta.get("val")
    inp = source.meta.get("val") if isinstance(source, fx.Node) else None
    return _same_shape(node, source) and out.dtype == inp.dtype and out.device == inp.device


def _normalise(args: object, keys: dict[fx.Node, object]) -> object:
    if isinstance(args, fx.Node):
        return keys.get(args, _SYMBOLIC)
    if isinstance(args, (list, tuple)):
        return tuple(_normalise(a, keys) for a in args)
    if isinstance(args, dict):
        return tuple((k, _normalise(v, keys)) for k, v in sorted(args.items()))
    if isinstance(args, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _SYMBOLIC
    return args


def _same_args(x: object, y: object) -> bool:
    """Equal, except that a symbolic size matches any integer or symbolic size."""
    if x == _SYMBOLIC or y == _SYMBOLIC:
        return x == y or isinstance(x if y == _SYMBOLIC else y, int)
    if isinstance(x, tuple) and isinstance(y, tuple):
        return len(x) == len(y) and all(_same_args(p, q) for p, q in zip(x, y))
    return x == y
