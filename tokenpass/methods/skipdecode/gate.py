"""Gate a decode step's layer blocks: each skippable layer becomes a branch on the schedule.

Before (one layer, flat in the step's graph)::

    h1 = add(h0, o_proj(attention(...)));  h2 = add(h1, down(mlp(norm(h1))))   # layer l
    ... = norm(h2)                                                            # layer l + 1

After::

    run_l = tokenpass.skipdecode_runs(input_ids, l, <schedule>)   # a host boolean: this step, this layer
    gated = layer_branch(run_l, layer_l, skip_l, (h0, <weights>, <cos/sin>, <stand-ins>))
    h2 = gated[0]                                                 # skip_l returns h0: identity
    ... = norm(h2)

``layer_l`` holds the layer's nodes unchanged (attention included, so a skipped layer also writes nothing
to its cache); ``skip_l`` returns the residual input and, for each other value later layers read, its
stand-in (``partition.py``). The gate is a real branch: a skipped layer costs one host decision.

``layer_branch`` has ``torch.cond``'s signature and meaning, but is a plain Python call: ``torch.cond``
dispatched eagerly costs about 0.6 ms per layer and step with a layer's operands (measured on SmolLM2,
where it ate most of what skipping 8 of 30 layers saves); ``torch.compile`` traces through either.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from tokenpass.ir.graph import TokenGraph
from tokenpass.methods.skipdecode.ops import layer_runs_op
from tokenpass.methods.skipdecode.partition import LayerBlock

GATE_META = "skipdecode"  # node.meta key marking what this pass made (idempotence, inspection)


def layer_branch(run: torch.Tensor, taken: fx.GraphModule, skipped: fx.GraphModule, operands: tuple) -> tuple:
    """``taken(*operands)`` if the gate says the layer runs this step, else ``skipped(*operands)``; traced by
    ``torch.compile``, the branch is ``torch.cond`` (a data-dependent branch it compiles both sides of)."""
    if torch.compiler.is_compiling():
        return torch.cond(run, taken, skipped, tuple(operands))
    return taken(*operands) if bool(run) else skipped(*operands)


def gate_blocks(graph: TokenGraph, blocks: list[LayerBlock], schedule_args: tuple, debug: bool) -> list[fx.Node]:
    """Replace each block by a gated branch; returns the branch nodes, in layer order."""
    gm, g = graph.program.graph_module, graph.graph
    user_inputs = graph.program.graph_signature.user_inputs
    by_name = {n.name: n for n in g.nodes if n.op == "placeholder"}
    input_ids = by_name[user_inputs[0]]
    renamed: dict[fx.Node, fx.Node] = {}  # a gated block's output -> the branch getitem standing for it
    branches = []
    output = next(n for n in g.nodes if n.op == "output")
    for block in blocks:
        branches.append(_gate(gm, g, block, input_ids, schedule_args, debug, renamed))
        for index in block.returned:
            past = by_name[user_inputs[index + 2]]  # (logits, present...) pairs with (ids, mask, positions, past...)
            output.update_arg(0, tuple(past if i == index else v for i, v in enumerate(output.args[0])))
            spec = graph.program.graph_signature.output_specs[index]
            spec.arg.name = past.name
        for node in reversed(block.nodes):
            g.erase_node(node)
    return branches


def _gate(gm: fx.GraphModule, g: fx.Graph, block: LayerBlock, input_ids: fx.Node, schedule_args: tuple, debug: bool,
          renamed: dict[fx.Node, fx.Node]) -> fx.Node:
    results = [block.residual_out, *block.carried]
    stand_ins = [renamed.get(s, s) for s in block.carried.values()]
    inputs = [renamed.get(n, n) for n in block.inputs]  # earlier gated layers' values are their getitems now
    taken = _subgraph(gm, block, inputs, results, skip=False)
    skipped = _subgraph(gm, block, inputs, results, skip=True)
    gm.register_module(f"skipdecode_layer_{block.index}", taken)
    gm.register_module(f"skipdecode_skip_{block.index}", skipped)
    mark = {"pass": GATE_META, "layer": block.index, "module": block.module}
    with g.inserting_after(block.nodes[-1]):
        run = g.call_function(layer_runs_op,
                              (input_ids, block.index, *schedule_args), {"debug": debug})
    with g.inserting_after(run):
        true_attr = g.get_attr(f"skipdecode_layer_{block.index}")
    with g.inserting_after(true_attr):
        false_attr = g.get_attr(f"skipdecode_skip_{block.index}")
    with g.inserting_after(false_attr):
        branch = g.call_function(layer_branch, (run, true_attr, false_attr, (*inputs, *stand_ins)))
    run.meta["val"] = torch.empty((), dtype=torch.bool)
    branch.meta["val"] = tuple(r.meta.get("val") for r in results)
    inside = set(block.nodes)
    previous = branch
    for i, result in enumerate(results):
        with g.inserting_after(previous):
            item = g.call_function(operator.getitem, (branch, i))
        item.meta = {k: v for k, v in result.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")}
        result.replace_all_uses_with(item, delete_user_cb=lambda user: user not in inside and user.op != "output")
        renamed[result] = item
        previous = item
    for node in (run, branch):
        node.meta["tokenpass"] = dict(mark, replaces=block.residual_out.name)
        node.meta["nn_module_stack"] = block.residual_out.meta.get("nn_module_stack", {})
    return branch


def _subgraph(gm: fx.GraphModule, block: LayerBlock, inputs: list[fx.Node], results: list[fx.Node], skip: bool
              ) -> fx.GraphModule:
    """The layer's nodes as a graph of ``(*inputs, *stand-ins)`` (``skip=False``), or the identity returning
    the residual input and the stand-ins, copied (``skip=True``)."""
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = sub.placeholder(node.name)
        env[node].meta = dict(node.meta)
    stand_ins = [sub.placeholder(f"stand_in_{i}") for i in range(len(block.carried))]
    for placeholder, value in zip(stand_ins, block.carried):
        placeholder.meta = {"val": value.meta.get("val")}
    if skip:  # copies, not the inputs themselves: torch.cond's branches may not alias their inputs
        residual = inputs[block.inputs.index(block.residual_in)]
        values = (env[residual], *stand_ins)
        sub.output(tuple(sub.call_function(torch.ops.aten.clone.default, (value,)) for value in values))
    else:
        for node in block.nodes:
            env[node] = sub.node_copy(node, lambda arg: env[arg])
        sub.output(tuple(env[r] for r in results))
    return fx.GraphModule(gm, sub)
