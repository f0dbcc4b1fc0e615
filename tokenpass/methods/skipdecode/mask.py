"""Mask a training step's layer blocks with the schedule: what fine-tuning under SkipDecode trains.

Before::

    h2 = add(h1, down(mlp(norm(h1))))          # end of layer l (h0 its residual input)

After::

    runs = tokenpass.skipdecode_mask(input_ids, l, <schedule>)    # [T] bool: does position t run layer l
    h2' = where(runs.view(1, T, 1), h2, h0)                         # skipped positions: identity

Every position is computed in one pass; a position that skips layer ``l`` keeps its residual input. This
equals decoding under the gate token by token: a position that runs layer ``l`` attends only to earlier
positions, which all ran ``l`` too (the schedule never deepens), so no masked-out value is ever read.
"""

from __future__ import annotations

import torch
from torch import fx

from tokenpass.ir.graph import TokenGraph
from tokenpass.methods.skipdecode.gate import GATE_META
from tokenpass.methods.skipdecode.ops import layer_mask_op
from tokenpass.methods.skipdecode.partition import LayerBlock

aten = torch.ops.aten


def mask_blocks(graph: TokenGraph, blocks: list[LayerBlock], schedule_args: tuple) -> list[fx.Node]:
    """Insert the per-position select after each block's residual output; returns the select nodes."""
    g = graph.graph
    first_input = graph.program.graph_signature.user_inputs[0]
    input_ids = next(n for n in g.nodes if n.op == "placeholder" and n.name == first_input)
    selects: list[fx.Node] = []
    masked: dict[fx.Node, fx.Node] = {}  # a masked layer's output -> its select (the next layer's input)
    for block in blocks:
        out = block.residual_out
        readers = [u for u in out.users if u not in set(block.nodes)]
        with g.inserting_after(out):
            runs = g.call_function(layer_mask_op, (input_ids, block.index, *schedule_args))
        with g.inserting_after(runs):
            column = g.call_function(aten.view.default, (runs, [1, -1, 1]))
        with g.inserting_after(column):
            select = g.call_function(aten.where.self, (column, out, masked.get(block.residual_in, block.residual_in)))
        val = out.meta["val"]
        runs.meta["val"] = val.new_empty((val.shape[1],), dtype=torch.bool)
        column.meta["val"] = val.new_empty((1, val.shape[1], 1), dtype=torch.bool)
        select.meta["val"] = out.meta["val"]
        for node in (runs, column, select):
            node.meta["tokenpass"] = {"pass": GATE_META, "layer": block.index, "replaces": out.name}
            node.meta["nn_module_stack"] = out.meta.get("nn_module_stack", {})
        for reader in readers:
            reader.replace_input_with(out, select)
        masked[out] = select
        selects.append(select)
    return selects
