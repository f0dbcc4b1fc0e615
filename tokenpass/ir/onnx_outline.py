"""tokenpass's ops in an exported ONNX file as ``tokenpass``-domain functions, not inlined node soup.

``torch.onnx.export`` inlines each op's translation (``ir/onnx_translations.py``) into the graph, but
tags every node it emits with the FX node it came from (``pkg.torch.onnx.fx_node``). Outlining groups
the nodes of each ``tokenpass::`` op call and moves them into a model-local function whose body is those
standard ops, leaving one call in their place::

    before:  Shape, Reshape, MatMul, Where, Softmax, ... (22 nodes from %attention_3)
    after:   attention_3 = tokenpass.Attention(q_3, cat_6, cat_7, mask)

Names follow the op: ``tokenpass::explicit_sparse_attention`` -> ``tokenpass.SparseAttention``, the
names the rewrites of foreign files give their functions too.

Calls with identical bodies (same options, e.g. every sparse layer of one scale) share one function;
the ``overload`` is a digest of the body. Initializers a body reads become ``Constant`` nodes inside it,
so a function is self-contained. A group that is not convex (a value leaves it and comes back through
other nodes, after the exporter's optimiser shared a node across groups) stays inlined: outlining it
would break the graph's order. The arithmetic is unchanged: the same nodes, moved.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from tokenpass.ir.foreign.trace import DOMAIN, register_function

_FX_CALL = re.compile(r"%(\S+) : .*call_function\[target=torch\.ops\.tokenpass\.(\w+)\.")


def outline_tokenpass_ops(model: ir.Model) -> dict[str, int]:
    """Outline every ``tokenpass::`` op call in ``model``'s graph; returns the calls made per function."""
    graph = model.graph
    groups: dict[str, list[ir.Node]] = defaultdict(list)
    ops: dict[str, str] = {}
    for node in graph:
        match = _FX_CALL.match(node.metadata_props.get("pkg.torch.onnx.fx_node", ""))
        if match:
            groups[match.group(1)].append(node)
            ops[match.group(1)] = match.group(2)
    made: dict[str, int] = defaultdict(int)
    for call, nodes in groups.items():
        if _convex(nodes):
            name = _function_name(ops[call])
            _outline(model, nodes, name, call)
            made[name] += 1
    if made:
        RemoveUnusedNodesPass()(model)  # initializers only the moved nodes read now live in the bodies
    return dict(made)


def _function_name(op: str) -> str:
    """``explicit_selection_attention`` -> ``SelectionAttention`` (which cache form it reads is the
    exporter's business, not the file reader's)."""
    return "".join(part.capitalize() for part in op.removeprefix("explicit_").split("_"))


def _convex(nodes: list[ir.Node]) -> bool:
    """No path leaves the group and re-enters it (else the call would need its own output as input)."""
    inside = set(map(id, nodes))
    frontier = [u for n in nodes for v in n.outputs for u, _ in v.uses() if id(u) not in inside]
    seen: set[int] = set()
    while frontier:
        node = frontier.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for value in node.outputs:
            for user, _ in value.uses():
                if id(user) in inside:
                    return False
                frontier.append(user)
    return True


def _outline(model: ir.Model, nodes: list[ir.Node], name: str, call: str) -> None:
    graph = model.graph
    inside = set(map(id, nodes))
    produced = {id(v) for n in nodes for v in n.outputs}
    external: list[ir.Value] = []
    for node in nodes:
        for value in node.inputs:
            if value is not None and id(value) not in produced and all(value is not e for e in external):
                external.append(value)
    outputs = [v for n in nodes for v in n.outputs
               if v.is_graph_output() or any(id(u) not in inside for u, _ in v.uses())]
    constants = [v for v in external if v.is_initializer() and not v.is_graph_input()]
    params = [v for v in external if not any(v is c for c in constants)]
    caller = ir.Node(DOMAIN, name, params, num_outputs=len(outputs), name=f"tokenpass_{call}",
                     metadata_props={"tokenpass.fx_node": call})
    graph.insert_before(nodes[0], caller)
    for old, new in zip(outputs, caller.outputs):
        new.name, new.type, new.shape = old.name, old.type, old.shape
        old.name = f"{call}_{old.name}"
        for user, index in list(old.uses()):
            if id(user) not in inside:
                user.replace_input_with(index, new)
        if old.is_graph_output():
            graph.outputs[[i for i, v in enumerate(graph.outputs) if v is old][0]] = new
    graph.remove(nodes, safe=False)
    body_nodes = [_constant(value) for value in constants]
    for old, node in zip(constants, body_nodes):
        _rewire(nodes, old, node.outputs[0])
    body_params = []
    for i, value in enumerate(params):
        param = ir.Value(name=f"input_{i}", type=value.type, shape=value.shape)
        _rewire(nodes, value, param)
        body_params.append(param)
    opset = model.opset_imports.get("", 18)
    body = ir.Graph(body_params, outputs, nodes=[*body_nodes, *nodes], opset_imports={"": opset}, name=name)
    function = ir.Function(DOMAIN, name, _digest(body), graph=body, attributes=[])
    caller.overload = function.overload
    register_function(model, function)


def _constant(value: ir.Value) -> ir.Node:
    node = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", value.const_value)], num_outputs=1)
    node.outputs[0].name, node.outputs[0].type, node.outputs[0].shape = f"const_{value.name}", value.type, value.shape
    return node


def _rewire(nodes: list[ir.Node], old: ir.Value, new: ir.Value) -> None:
    for node in nodes:
        for index, value in enumerate(node.inputs):
            if value is old:
                node.replace_input_with(index, new)


def _digest(body: ir.Graph) -> str:
    """Equal bodies (ops, attributes, constants, wiring by position) get equal digests."""
    position = {id(v): f"p{i}" for i, v in enumerate(body.inputs)}
    parts = []
    for n, node in enumerate(body):
        for j, out in enumerate(node.outputs):
            position[id(out)] = f"n{n}.{j}"
        attrs = sorted((k, _attribute_text(a)) for k, a in node.attributes.items())
        parts.append(f"{node.op_type}({','.join(position.get(id(v), '-') for v in node.inputs)}){attrs}")
    parts.append("->" + ",".join(position[id(v)] for v in body.outputs))
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:10]


def _attribute_text(attribute: ir.Attr) -> str:
    value = attribute.value
    if isinstance(value, ir.TensorProtocol):
        return f"{value.dtype}{value.shape}{value.numpy().tobytes().hex()}"
    return repr(value)
