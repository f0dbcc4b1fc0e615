"""TidalDecode's explicit-cache ops in standard ONNX ops (TopK, GatherElements, Softmax, MatMul).

Each translation means what its torch reference means (``explicit_ops.py``): scores in fp32, dead slots
at -inf, the per-KV-head vote summing each group's softmax probabilities, ``min(top_k, S - 1)`` past
slots chosen by TopK, and attention over the chosen slots plus the step's own slot (always live). The
ranking approximation picks, per KV head, the ``score_channels`` channels where the query group has the
most magnitude and gathers only those channels of the keys.
"""

from __future__ import annotations

from tokenpass.ir.onnx_slots import FLOAT, attend_slots, dim, grouped_query, live, masked, scaled
from tokenpass.ir.onnx_translations import register_onnx_translation
from tokenpass.methods.tidaldecode.explicit_ops import explicit_selection_op, explicit_sparse_op


def _decode_scores(op, grouped, key, keep, scale: float, softcap: float | None, channels: int):
    """``[B, Hkv, G, S]`` fp32 scores of the grouped query ``[B, Hkv, G, D]``: exact, or over the
    ``channels`` channels where the group's queries have the most magnitude."""
    keys = op.Cast(key, to=FLOAT)
    if channels:
        picked = op.TopK(op.ReduceSum(op.Abs(grouped), [2], keepdims=0), [channels], axis=-1)[1]  # [B, Hkv, r]
        wide = op.Unsqueeze(picked, [2])
        b, hkv, r = dim(op, grouped, 0), dim(op, grouped, 1), op.Constant(value_ints=[channels])
        grouped = op.GatherElements(grouped, op.Expand(wide, op.Concat(b, hkv, dim(op, grouped, 2), r, axis=0)),
                                    axis=3)
        keys = op.GatherElements(keys, op.Expand(wide, op.Concat(b, hkv, dim(op, key, 2), r, axis=0)), axis=3)
    scores = scaled(op, op.MatMul(grouped, op.Transpose(keys, perm=[0, 1, 3, 2])), scale, softcap)
    return masked(op, scores, keep, 2)


def _top_slots(op, scores, top_k: int, per_kv_head: bool):
    """The ``min(top_k, S - 1)`` past slots ranked highest, per KV head (the group's probabilities summed)
    or per query head."""
    past = op.Slice(scores, [0], [-1], [3])
    if per_kv_head:
        probs = op.Softmax(past, axis=-1)
        ranking = op.ReduceSum(op.Where(op.IsNaN(probs), op.Constant(value_float=0.0), probs), [2], keepdims=0)
    else:
        ranking = op.Reshape(past, op.Concat(dim(op, past, 0), op.Constant(value_ints=[-1]), dim(op, past, 3),
                                             axis=0))
    k = op.Min(op.Constant(value_ints=[top_k]), dim(op, past, 3))
    return op.TopK(ranking, k, axis=-1)[1]


def explicit_selection_onnx(query, key, value, mask=None, scale: float = 1.0, layer: int = 0, top_k: int = 1,
                            per_kv_head: bool = True, sparse_output: bool = True, score_dtype=None,
                            score_channels: int = 0, softcap: float | None = None):
    from onnxscript import opset18 as op

    if score_dtype is not None:
        raise NotImplementedError("TidalDecode(score_dtype=...) has no ONNX form yet; export with score_dtype=None")
    grouped = grouped_query(op, query, dim(op, key, 1))
    keep = live(op, mask, key)
    channels = score_channels if sparse_output else 0
    scores = _decode_scores(op, grouped, key, keep, scale, softcap, channels)
    slots = _top_slots(op, scores, top_k, per_kv_head)
    if sparse_output:
        return attend_slots(op, query, key, value, keep, slots, scale, softcap), slots
    out = op.MatMul(op.Softmax(scores, axis=-1), op.Cast(value, to=FLOAT))  # [B, Hkv, G, D]
    return op.CastLike(op.Reshape(out, op.Shape(query)), query), slots


def explicit_sparse_onnx(query, key, value, mask=None, slots=None, scale: float = 1.0, layer: int = 0,
                         softcap: float | None = None):
    from onnxscript import opset18 as op

    return attend_slots(op, query, key, value, live(op, mask, key), slots, scale, softcap)


register_onnx_translation(explicit_selection_op, explicit_selection_onnx)
register_onnx_translation(explicit_sparse_op, explicit_sparse_onnx)
