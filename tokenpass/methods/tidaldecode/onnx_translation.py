"""TidalDecode's explicit-cache ops in standard ONNX ops (TopK, GatherElements, Softmax, MatMul).

Each translation means what its torch reference means (``explicit_ops.py``): scores in fp32, dead slots
at -inf, the per-KV-head vote summing each group's softmax probabilities, ``min(top_k, S - 1)`` past
slots chosen by TopK, and attention over the chosen slots plus the step's own slot (always live). The
ranking approximation picks, per KV head, the ``score_channels`` channels where the query group has the
most magnitude and gathers only those channels of the keys.
"""

from __future__ import annotations

from tokenpass.ir.onnx_translations import is_bool, register_onnx_translation
from tokenpass.methods.tidaldecode.explicit_ops import explicit_selection_op, explicit_sparse_op

FLOAT = 1  # onnx.TensorProto.FLOAT
BOOL = 9


def _dim(op, x, axis: int):
    return op.Shape(x, start=axis, end=axis + 1)


def _static_dim(x, axis: int) -> int | None:
    """``x``'s size on ``axis`` when the trace knows it as a number (head counts do)."""
    shape = getattr(x, "shape", None)
    try:
        dim = shape[axis]
    except (TypeError, IndexError):
        return None
    return dim if isinstance(dim, int) else None


def _live(op, mask, key):
    """``[B, Hkv, S]`` liveness from the one-query mask (bool keeps, additive keeps what is not hugely
    negative, as ``ir/masks.visible``; the first head's, as in ``explicit_ops.live_slots``), or None."""
    if mask is None:
        return None
    keep = mask if is_bool(mask) else op.Greater(mask, op.CastLike(_half_lowest(mask), mask))
    last = op.Squeeze(op.Slice(keep, [0, -1], [1, 2**62], [1, 2]), [2])  # the first head's row of the one query
    return op.Expand(last, op.Concat(_dim(op, key, 0), _dim(op, key, 1), _dim(op, key, 2), axis=0))


def _half_lowest(mask) -> float:
    """Half the lowest value of an additive mask's dtype: below it a slot is masked (``ir/masks.visible``)."""
    import onnx_ir as ir

    lowest = -65504.0 if mask.dtype == ir.DataType.FLOAT16 else -3.3895313892515355e38  # fp16, else fp32/bf16
    return lowest / 2


def _scaled(op, scores, scale: float, softcap: float | None):
    scores = op.Mul(scores, op.Constant(value_float=float(scale)))
    if softcap is not None:
        cap = op.Constant(value_float=float(softcap))
        scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
    return scores


def _masked(op, scores, keep, axis: int):
    """Scores with dead slots at -inf; ``keep`` gains a size-1 axis at ``axis`` to broadcast."""
    if keep is None:
        return scores
    return op.Where(op.Unsqueeze(keep, [axis]), scores, op.Constant(value_float=float("-inf")))


def _decode_scores(op, grouped, key, keep, scale: float, softcap: float | None, channels: int):
    """``[B, Hkv, G, S]`` fp32 scores of the grouped query ``[B, Hkv, G, D]``: exact, or over the
    ``channels`` channels where the group's queries have the most magnitude."""
    keys = op.Cast(key, to=FLOAT)
    if channels:
        picked = op.TopK(op.ReduceSum(op.Abs(grouped), [2], keepdims=0), [channels], axis=-1)[1]  # [B, Hkv, r]
        wide = op.Unsqueeze(picked, [2])
        b, hkv, r = _dim(op, grouped, 0), _dim(op, grouped, 1), op.Constant(value_ints=[channels])
        grouped = op.GatherElements(grouped, op.Expand(wide, op.Concat(b, hkv, _dim(op, grouped, 2), r, axis=0)),
                                    axis=3)
        keys = op.GatherElements(keys, op.Expand(wide, op.Concat(b, hkv, _dim(op, key, 2), r, axis=0)), axis=3)
    scores = _scaled(op, op.MatMul(grouped, op.Transpose(keys, perm=[0, 1, 3, 2])), scale, softcap)
    return _masked(op, scores, keep, 2)


def _top_slots(op, scores, top_k: int, per_kv_head: bool):
    """The ``min(top_k, S - 1)`` past slots ranked highest, per KV head (the group's probabilities summed)
    or per query head."""
    past = op.Slice(scores, [0], [-1], [3])
    if per_kv_head:
        probs = op.Softmax(past, axis=-1)
        ranking = op.ReduceSum(op.Where(op.IsNaN(probs), op.Constant(value_float=0.0), probs), [2], keepdims=0)
    else:
        ranking = op.Reshape(past, op.Concat(_dim(op, past, 0), op.Constant(value_ints=[-1]), _dim(op, past, 3),
                                             axis=0))
    k = op.Min(op.Constant(value_ints=[top_k]), _dim(op, past, 3))
    return op.TopK(ranking, k, axis=-1)[1]


def _per_selecting_head(op, x, selecting_heads, same_heads: bool):
    """``[B, Hkv, S, ...]`` as ``[B, Hsel, S, ...]``: each selecting head reads its KV head."""
    if same_heads:
        return x
    b, hkv = _dim(op, x, 0), _dim(op, x, 1)
    rest = op.Shape(x, start=2)
    grown = op.Expand(op.Unsqueeze(x, [2]), op.Concat(b, hkv, op.Div(selecting_heads, hkv), rest, axis=0))
    return op.Reshape(grown, op.Concat(b, selecting_heads, rest, axis=0))


def _attend_slots(op, query, key, value, keep, slots, scale: float, softcap: float | None):
    """Attention over ``slots`` ``[B, Hsel, k]`` plus the step's own (last) slot, always live."""
    b, hsel, d = _dim(op, slots, 0), _dim(op, slots, 1), _dim(op, key, 3)
    same = _static_dim(slots, 1) is not None and _static_dim(slots, 1) == _static_dim(key, 1)
    one = op.Constant(value_ints=[1])
    own = op.Expand(op.Sub(_dim(op, key, 2), one), op.Concat(b, hsel, one, axis=0))
    index = op.Concat(slots, own, axis=-1)  # [B, Hsel, k + 1]
    rows = op.Expand(op.Unsqueeze(index, [3]), op.Concat(b, hsel, _dim(op, index, 2), d, axis=0))
    keys = op.Cast(op.GatherElements(_per_selecting_head(op, key, hsel, same), rows, axis=2), to=FLOAT)
    values = op.Cast(op.GatherElements(_per_selecting_head(op, value, hsel, same), rows, axis=2), to=FLOAT)
    grouped = op.Reshape(op.Cast(query, to=FLOAT), op.Concat(b, hsel, op.Constant(value_ints=[-1]), d, axis=0))
    scores = _scaled(op, op.MatMul(grouped, op.Transpose(keys, perm=[0, 1, 3, 2])), scale, softcap)
    if keep is not None:
        chosen = op.GatherElements(_per_selecting_head(op, keep, hsel, same), slots, axis=2)
        own_live = op.Cast(op.Expand(one, op.Concat(b, hsel, one, axis=0)), to=BOOL)
        keep = op.Concat(chosen, own_live, axis=-1)
    probs = op.Softmax(_masked(op, scores, keep, 2), axis=-1)
    return op.CastLike(op.Reshape(op.MatMul(probs, values), op.Shape(query)), query)


def explicit_selection_onnx(query, key, value, mask=None, scale: float = 1.0, layer: int = 0, top_k: int = 1,
                            per_kv_head: bool = True, sparse_output: bool = True, score_dtype=None,
                            score_channels: int = 0, softcap: float | None = None):
    from onnxscript import opset18 as op

    if score_dtype is not None:
        raise NotImplementedError("TidalDecode(score_dtype=...) has no ONNX form yet; export with score_dtype=None")
    b, hkv, d = _dim(op, query, 0), _dim(op, key, 1), _dim(op, query, 3)
    grouped = op.Reshape(op.Cast(query, to=FLOAT), op.Concat(b, hkv, op.Constant(value_ints=[-1]), d, axis=0))
    keep = _live(op, mask, key)
    channels = score_channels if sparse_output else 0
    scores = _decode_scores(op, grouped, key, keep, scale, softcap, channels)
    slots = _top_slots(op, scores, top_k, per_kv_head)
    if sparse_output:
        return _attend_slots(op, query, key, value, keep, slots, scale, softcap), slots
    out = op.MatMul(op.Softmax(scores, axis=-1), op.Cast(value, to=FLOAT))  # [B, Hkv, G, D]
    return op.CastLike(op.Reshape(out, op.Shape(query)), query), slots


def explicit_sparse_onnx(query, key, value, mask=None, slots=None, scale: float = 1.0, layer: int = 0,
                         softcap: float | None = None):
    from onnxscript import opset18 as op

    return _attend_slots(op, query, key, value, _live(op, mask, key), slots, scale, softcap)


register_onnx_translation(explicit_selection_op, explicit_selection_onnx)
register_onnx_translation(explicit_sparse_op, explicit_sparse_onnx)
