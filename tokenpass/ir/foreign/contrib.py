"""onnxruntime's fused ``com.microsoft.GroupQueryAttention`` lowered to tokenpass's canonical attention.

onnxruntime-genai's model builder writes each layer's attention as one fused node that unpacks Q/K/V,
applies the rotary embedding, appends to the cache and attends, with padding given as per-row lengths
(``seqlens_k = sum(attention_mask) - 1``), which assumes *right* padding. A method cannot reach inside
it, so each node is spelled out in standard ops around a ``tokenpass.Attention`` call::

    Before:  out, present_k, present_v = GroupQueryAttention(qkv, , , past_k, past_v, seqlens_k, total,
                                                             cos_cache, sin_cache)   # num_heads=9, kv=3
    After:   q, k, v   = Split(Reshape(qkv, [0, 0, 9 + 2 * 3, -1]), [9, 3, 3], axis=2)  -> [B, H, S, D]
             q, k      = rotary(q, position_ids), rotary(k, position_ids)   # cos/sin_cache rows
             present_k = Concat(past_k, k, axis=2);  present_v = Concat(past_v, v, axis=2)
             out       = Reshape(Transpose(tokenpass.Attention(q, present_k, present_v, causal & padding)))

Positions come from a ``position_ids`` input (added, as tokenpass's step interface has it) and the mask
from ``attention_mask``, so a left-padded batch, which tokenpass's runtimes feed, is right, where the
fused op assumed right padding; on unpadded rows the two agree, and ``optimize_onnx`` checks that by
running both. What cannot be lowered (a sliding window, interleaved rotary...) stays fused and is
refused by name (``sites.gqa_refusal``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from tokenpass.errors import CaptureError
from tokenpass.ir.foreign.canonicalize import insert_call
from tokenpass.ir.foreign.sites import OnnxAttentionSite, gqa_refusal
from tokenpass.ir.onnx_slots import static_dim
from tokenpass.ir.onnx_translations import attention_onnx

GQA = ("com.microsoft", "GroupQueryAttention")
SPELLING = "com.microsoft-gqa"


@dataclass
class StepValues:
    """What every lowered layer reads from the step's inputs, built once per graph."""

    positions: ir.Value  # [B, S] int64
    mask: ir.Value  # [B, 1, S, T] bool: causal and not padding


def lower_group_query_attention(model: ir.Model, opset: int, name: str) -> int:
    """Lower every GroupQueryAttention that ``gqa_refusal`` accepts; returns how many were lowered."""
    graph = model.graph
    nodes = [n for n in graph if (n.domain, n.op_type) == GQA and gqa_refusal(n) is None]
    if not nodes:
        return 0
    step = _step_values(graph, nodes[0], name)
    for layer, node in enumerate(nodes):
        _lower(model, node, layer, step, opset, name)
    return len(nodes)


def lower_simplified_layer_norm(model: ir.Model) -> int:
    """onnxruntime's ``SimplifiedLayerNormalization`` (RMS norm, registered by onnxruntime in the standard
    domain, unknown to ONNX's checker) as standard ops: ``x / sqrt(mean(x^2, -1) + eps) * scale``,
    computed in float32 as its ``stash_type=1`` does. Returns how many were lowered (those normalising
    the last axis whose inverse-deviation output nobody reads)."""
    nodes = [n for n in model.graph if (n.domain, n.op_type) == ("", "SimplifiedLayerNormalization")
             and n.attributes.get_int("axis", -1) == -1 and not any(o.uses() for o in n.outputs[1:])]
    for node in nodes:
        x, scale = node.inputs[0], node.inputs[1]
        tape = ir.tape.Tape()
        wide = tape.op("Cast", [x], {"to": ir.DataType.FLOAT})
        mean = tape.op("ReduceMean", [tape.op("Mul", [wide, wide]), _ints(tape, [-1])], {"keepdims": 1})
        epsilon = tape.op("Constant", [], {"value": ir.tensor(np.array(
            node.attributes.get_float("epsilon", 1e-5), dtype=np.float32))})
        normed = tape.op("Div", [wide, tape.op("Sqrt", [tape.op("Add", [mean, epsilon])])])
        out = tape.op("Mul", [tape.op("CastLike", [normed, x]), scale])
        out.type, out.shape = node.outputs[0].type, node.outputs[0].shape
        _replace_node(node, tape, [out])
    return len(nodes)


def _lower(model: ir.Model, node: ir.Node, layer: int, step: StepValues, opset: int, name: str) -> None:
    heads, kv_heads = node.attributes.get_int("num_heads"), node.attributes.get_int("kv_num_heads")
    head_dim = _head_dim(node, heads, kv_heads, name)
    past_key, past_value = node.inputs[3], node.inputs[4]
    tape = ir.tape.Tape()
    query, key, value = _heads(tape, node, heads, kv_heads)
    if node.attributes.get_int("do_rotary", 0):
        cos, sin = (tape.op("Unsqueeze", [tape.op("Gather", [table, step.positions]), _ints(tape, [1])])
                    for table in (node.inputs[7], node.inputs[8]))
        query, key = _rotate(tape, query, cos, sin), _rotate(tape, key, cos, sin)
    key = tape.op("Concat", [past_key, key], {"axis": 2})
    value = tape.op("Concat", [past_value, value], {"axis": 2})
    for cache, past in ((key, past_key), (value, past_value)):
        past.shape = ir.Shape([past.shape[0], kv_heads, past.shape[2], head_dim])
        cache.type, cache.shape = past.type, ir.Shape([past.shape[0], kv_heads, None, head_dim])
    query.type = past_key.type
    for created in tape.nodes:
        node.graph.insert_before(node, created)
    scale = node.attributes.get_float("scale", 0.0) or 1 / math.sqrt(head_dim)
    softcap = node.attributes.get_float("softcap", 0.0) or None
    site = OnnxAttentionSite(layer, node, query, key, value, step.mask, scale, softcap, SPELLING)
    call = insert_call(model, site, attention_onnx, "Attention", opset)
    _take_over_outputs(node, call.outputs[0], key, value)


def _heads(tape: ir.tape.Tape, node: ir.Node, heads: int, kv_heads: int) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Query, keys and values as [B, heads, S, D], from a packed QKV input or three separate ones."""
    if node.inputs[1] is None:
        packed = tape.op("Reshape", [node.inputs[0], _ints(tape, [0, 0, heads + 2 * kv_heads, -1])])
        split = tape.op_multi_out("Split", [packed, _ints(tape, [heads, kv_heads, kv_heads])], {"axis": 2},
                                  num_outputs=3)
    else:
        split = [tape.op("Reshape", [value, _ints(tape, [0, 0, count, -1])])
                 for value, count in zip(node.inputs[:3], (heads, kv_heads, kv_heads))]
    return tuple(tape.op("Transpose", [v], {"perm": [0, 2, 1, 3]}) for v in split)


def _rotate(tape: ir.tape.Tape, x: ir.Value, cos: ir.Value, sin: ir.Value) -> ir.Value:
    """The non-interleaved rotary embedding (GPT-NeoX / Llama): halves (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    first, second = tape.op_multi_out("Split", [x], {"axis": -1, "num_outputs": 2}, num_outputs=2)
    rotated_first = tape.op("Sub", [tape.op("Mul", [first, cos]), tape.op("Mul", [second, sin])])
    rotated_second = tape.op("Add", [tape.op("Mul", [second, cos]), tape.op("Mul", [first, sin])])
    return tape.op("Concat", [rotated_first, rotated_second], {"axis": -1})


def _take_over_outputs(node: ir.Node, attention: ir.Value, key: ir.Value, value: ir.Value) -> None:
    """The fused node's output ([B, S, H * D]), present keys and present values replaced."""
    tape = ir.tape.Tape()
    transposed = tape.op("Transpose", [attention], {"perm": [0, 2, 1, 3]})
    merged = tape.op("Reshape", [transposed, _ints(tape, [0, 0, -1])])
    merged.type, merged.shape = node.outputs[0].type, node.outputs[0].shape
    _replace_node(node, tape, [merged, key, value])


def _replace_node(node: ir.Node, tape: ir.tape.Tape, outputs: list[ir.Value]) -> None:
    """``tape``'s nodes inserted before ``node``, ``outputs`` taking over its outputs' uses and names (graph
    outputs included: a present cache keeps its name), ``node`` removed."""
    for created in tape.nodes:
        node.graph.insert_before(node, created)
    old = list(node.outputs[: len(outputs)])
    names = [v.name for v in old]
    for v in old:
        v.name = None
    ir.convenience.replace_all_uses_with(old, outputs, replace_graph_outputs=True)
    for out, name in zip(outputs, names):
        out.name = name
    node.graph.remove(node, safe=True)


def _step_values(graph: ir.Graph, first: ir.Node, name: str) -> StepValues:
    """Positions (the ``position_ids`` input, added if missing) and the causal + padding mask from
    ``attention_mask``, inserted before the first lowered node."""
    inputs = {v.name: v for v in graph.inputs}
    if "attention_mask" not in inputs or "input_ids" not in inputs:
        raise CaptureError(f"{name}: GroupQueryAttention reads padding from seqlens_k; lowering it needs the "
                           "graph's input_ids and attention_mask inputs")
    ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    positions = inputs.get("position_ids")
    if positions is None:
        positions = ir.Value(name="position_ids", type=ir.TensorType(ir.DataType.INT64), shape=ids.shape)
        graph.inputs.append(positions)
    tape = ir.tape.Tape()
    total = tape.op("Squeeze", [tape.op("Shape", [attention_mask], {"start": 1, "end": 2})])
    new = tape.op("Squeeze", [tape.op("Shape", [ids], {"start": 1, "end": 2})])
    zero, one = (tape.op("Constant", [], {"value": ir.tensor(np.array(i, dtype=np.int64))}) for i in (0, 1))
    keys = tape.op("Unsqueeze", [tape.op("Range", [zero, total, one]), _ints(tape, [0])])
    queries = tape.op("Unsqueeze", [tape.op("Range", [tape.op("Sub", [total, new]), total, one]), _ints(tape, [1])])
    causal = tape.op("Unsqueeze", [tape.op("LessOrEqual", [keys, queries]), _ints(tape, [0, 1])])  # [1, 1, S, T]
    padding = tape.op("Unsqueeze", [tape.op("Cast", [attention_mask], {"to": ir.DataType.BOOL}), _ints(tape, [1, 2])])
    mask = tape.op("And", [causal, padding])
    mask.name = "tokenpass_causal_padding_mask"
    mask.type = ir.TensorType(ir.DataType.BOOL)
    mask.shape = ir.Shape([ids.shape[0], 1, ids.shape[1], attention_mask.shape[1]])
    for created in tape.nodes:
        graph.insert_before(first, created)
    return StepValues(positions, mask)


def _head_dim(node: ir.Node, heads: int, kv_heads: int, name: str) -> int:
    """The head size from whichever shape states it: the past, the rotary tables, or the (packed) query."""
    packed = node.inputs[1] is None
    candidates = [static_dim(node.inputs[3], 3)]
    if len(node.inputs) > 7 and node.inputs[7] is not None and (half := static_dim(node.inputs[7], 1)):
        candidates.append(2 * half)
    if (width := static_dim(node.inputs[0], -1)) is not None:
        candidates.append(width // (heads + 2 * kv_heads if packed else heads))
    for candidate in candidates:
        if candidate:
            return candidate
    raise CaptureError(f"{name}: node '{node.name}': the head size is not static in any of its inputs' shapes")


def _ints(tape: ir.tape.Tape, values: list[int]) -> ir.Value:
    return tape.op("Constant", [], {"value": ir.tensor(np.array(values, dtype=np.int64))})
