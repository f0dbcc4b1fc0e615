"""Partition a captured step into stem, per-layer blocks and head, and say how to skip each block.

A block is every node whose module stack contains one decoder layer (the modules the attention sites sit
in). Skipping a block means its residual-stream output becomes its residual-stream input. Both are found
from what the graph computes, not from a model family:

* the **residual output** is the block's floating-point output that later nodes read (the next layer, the
  final norm); exactly one is required;
* the **residual input** is the block input that reaches the residual output through additions only
  (``x + attn + mlp`` in every pre-norm, post-norm or parallel-residual decoder), through casts that
  change nothing.

Other values a block hands to later layers (TidalDecode's selected slots) fall back, when the block is
skipped, to the same op's value from the nearest earlier layer that computes one: "the last selection
that ran". A block whose cross-layer value has no earlier counterpart cannot be skipped, and the pass
says so naming the node. Values a block hands to the graph's outputs (a lowered step's ``present``
keys/values, which the runtime does not read) are listed in ``returned``: the gate reroutes them to the
step's matching ``past`` input, since a skipped layer adds nothing to its cache.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from tokenpass.ir.sites import module_stack, tensor_meta
from tokenpass.passes.base import Miss

aten = torch.ops.aten
_IDENTITY_OPS = {aten.to.dtype, aten._to_copy.default, aten.alias.default, aten.clone.default}


class NoBlock(Exception):
    """Why a layer cannot be cut out as a skippable block (a ``Miss``)."""

    def __init__(self, miss: Miss):
        super().__init__(str(miss))
        self.miss = miss


@dataclass
class LayerBlock:
    """One decoder layer's nodes and how its values leave it."""

    index: int
    module: str
    nodes: list[fx.Node]
    inputs: list[fx.Node]  # values defined outside the block that it reads, in first-use order
    residual_in: fx.Node
    residual_out: fx.Node
    # Other block values later layers read, each with its stand-in when the block is skipped.
    carried: dict[fx.Node, fx.Node] = field(default_factory=dict)
    # Block values the graph returns (output index -> node): rerouted to the step's past inputs.
    returned: dict[int, fx.Node] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"layer {self.index} ({self.module})"


def layer_of(node: fx.Node, modules: dict[str, int]) -> int | None:
    """The decoder layer ``node`` belongs to: the layer module in its module stack, if any."""
    for path, _ in module_stack(node):
        if path in modules:
            return modules[path]
    return None


def cut_blocks(graph: fx.Graph, modules: dict[str, int], wanted: list[int]) -> list[LayerBlock]:
    """The blocks of layers ``wanted`` (module path -> layer index in ``modules``), in layer order, with
    each cross-layer value's stand-in resolved; raises ``NoBlock`` for the first layer that cannot be cut."""
    members: dict[int, list[fx.Node]] = {}
    owner: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        layer = layer_of(node, modules)
        if layer is None and node.target is operator.getitem and node.args[0] in owner:
            layer = owner[node.args[0]]  # an element of a layer's multi-output op belongs to the layer
        if layer is not None:
            owner[node] = layer
            members.setdefault(layer, []).append(node)
    paths = {index: path for path, index in modules.items()}
    blocks: list[LayerBlock] = []
    for index in sorted(wanted):
        if index not in members:
            raise NoBlock(Miss(f"layer {index}", "block", "no node of the graph belongs to this layer's module"))
        blocks.append(_cut(graph, index, paths[index], members[index], members, set(wanted)))
    return blocks


def _cut(graph: fx.Graph, index: int, module: str, nodes: list[fx.Node], members: dict[int, list[fx.Node]],
         gated: set[int]) -> LayerBlock:
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    label = f"layer {index} ({module})"
    last = nodes[-1]
    order = {n: i for i, n in enumerate(graph.nodes)}
    escaping = [n for n in nodes if any(u not in inside for u in n.users)]
    for node in escaping:
        early = [u for u in node.users if u not in inside and order[u] < order[last]]
        if early:
            raise NoBlock(Miss(label, "contiguous", f"node {early[0].name} outside the layer runs between its "
                                                   f"nodes and reads {node.name}"))
    later_layers = {n for i, ns in members.items() if i > index for n in ns}
    output = next(n for n in graph.nodes if n.op == "output")
    residual = [n for n in escaping if _is_float(n) and any(u is not output for u in n.users if u not in inside)]
    if len(residual) != 1:
        found = ", ".join(n.name for n in residual) or "none"
        raise NoBlock(Miss(label, "residual stream", f"expected one floating-point value read after the layer, "
                                                     f"found {found}"))
    residual_out = residual[0]
    block = LayerBlock(index, module, nodes, inputs, _residual_in(residual_out, inside, inputs, label), residual_out)
    for node in escaping:
        outside_users = [u for u in node.users if u not in inside]
        if output in outside_users:
            block.returned.update({i: node for i, value in enumerate(output.args[0]) if value is node})
        readers = [u for u in outside_users if u is not output]
        if node is residual_out or not readers:
            continue
        stray = [u for u in readers if u not in later_layers]
        if stray:
            raise NoBlock(Miss(label, "cross-layer value", f"{node.name} is read by {stray[0].name}, which belongs "
                                                           f"to no later layer"))
        block.carried[node] = _stand_in(node, index, members, gated, label)
    return block


def _is_float(node: fx.Node) -> bool:
    meta = tensor_meta(node)
    return meta is not None and meta.dtype.is_floating_point


def _residual_in(out: fx.Node, inside: set[fx.Node], inputs: list[fx.Node], label: str) -> fx.Node:
    """The block input that reaches ``out`` through additions only, with ``out``'s shape and dtype."""
    shape, dtype = tensor_meta(out).shape, tensor_meta(out).dtype
    found: list[fx.Node] = []
    frontier, seen = [out] if out.target == aten.add.Tensor else [], set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        for arg in node.args:
            meta = tensor_meta(arg)
            if arg in inputs and meta is not None and meta.shape == shape and meta.dtype == dtype:
                found.append(arg)
            elif arg in inside and (arg.target == aten.add.Tensor or _is_identity(arg)):
                frontier.append(arg)
    found = list(dict.fromkeys(found))
    if len(found) != 1:
        raise NoBlock(Miss(label, "residual stream", f"{out.name} is not an input plus the layer's updates "
                                                     f"(inputs reached by additions: {len(found)})"))
    return found[0]


def _is_identity(node: fx.Node) -> bool:
    """A cast or copy that changes nothing (``x.to(float32)`` of a float32 ``x``, left until clean-up)."""
    if node.target not in _IDENTITY_OPS or not isinstance(node.args[0], fx.Node):
        return False
    before, after = tensor_meta(node.args[0]), tensor_meta(node)
    return before is not None and after is not None and before.dtype == after.dtype and before.shape == after.shape


def _element(producer: fx.Node, item: int, like: fx.Node) -> fx.Node:
    """``producer[item]`` as a node (a new getitem after ``producer`` if the graph has none)."""
    existing = [u for u in producer.users if u.target is operator.getitem and u.args[1] == item]
    if existing:
        return existing[0]
    with producer.graph.inserting_after(producer):
        element = producer.graph.call_function(operator.getitem, (producer, item))
    element.meta = {k: v for k, v in like.meta.items() if k in ("val", "tensor_meta")}
    return element


def _kind(node: fx.Node) -> tuple:
    """What computes ``node``, for matching a value with its counterpart in another layer."""
    meta = tensor_meta(node)
    shape = (meta.dtype, meta.dim()) if meta is not None else None
    if node.target is operator.getitem:
        return (node.args[0].target, node.args[1], shape)
    return (node.target, shape)


def _stand_in(node: fx.Node, index: int, members: dict[int, list[fx.Node]], gated: set[int], label: str) -> fx.Node:
    """The same op's value in the nearest earlier layer: what later layers read when ``index`` is skipped.
    A gated earlier layer offers only values that leave it (the others vanish into its branch); an
    ungated one also the unread element of a multi-output op (clean-up may have dropped its getitem)."""
    kind = _kind(node)
    for earlier in range(index - 1, -1, -1):
        nodes = members.get(earlier, [])
        inside = set(nodes)
        matches = [n for n in nodes if _kind(n) == kind
                   and (earlier not in gated or any(u not in inside for u in n.users))]
        if matches:
            return matches[-1]
        if node.target is operator.getitem and earlier not in gated:
            producers = [n for n in nodes if n.target == node.args[0].target]
            if producers:
                return _element(producers[-1], node.args[1], node)
    raise NoBlock(Miss(label, "cross-layer value", f"later layers read {node.name} and no earlier layer computes "
                                                   f"one to stand in when this layer is skipped; keep it in the "
                                                   f"warm-up (raise warmup above {index})"))
