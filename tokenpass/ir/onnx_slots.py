"""Standard-ONNX building blocks for attention over chosen KV-cache slots, shared by methods' translations.

A method that attends over a choice of cache slots (a sparse layer reading another layer's choice, a
layer reading its own soft-voted choice) exports the arithmetic of
``kernels/sparse_attention_ref.sparse_attention_reference``: fp32 scores, soft cap, dead slots at -inf,
softmax, and the step's own (last) slot always read. The helpers take onnxscript's
``op`` (an opset module) and traced values; Python decides from constants which ops to emit.

Liveness comes from the model's one-query mask, bool (True keeps) or additive (what is not hugely
negative keeps, as ``ir/masks.visible``); a method's pass checks first that the mask is causal +
padding on every head, so the first head's row speaks for all.
"""

from __future__ import annotations

from tokenpass.ir.onnx_translations import is_bool

FLOAT = 1  # onnx.TensorProto.FLOAT
BOOL = 9
INT64 = 7


def dim(op, x, axis: int):
    return op.Shape(x, start=axis, end=axis + 1)


def static_dim(x, axis: int) -> int | None:
    """``x``'s size on ``axis`` when the trace knows it as a number (head counts do)."""
    shape = getattr(x, "shape", None)
    try:
        size = shape[axis]
    except (TypeError, IndexError):
        return None
    return size if isinstance(size, int) else None


def live(op, mask, key):
    """``[B, Hkv, S]`` liveness from the one-query mask (bool keeps, additive keeps what is not hugely
    negative, as ``ir/masks.visible``; the first head's, as ``ir/masks.one_query_liveness``), or None."""
    if mask is None:
        return None
    keep = mask if is_bool(mask) else op.Greater(mask, op.CastLike(half_lowest(mask), mask))
    last = op.Squeeze(op.Slice(keep, [0, -1], [1, 2**62], [1, 2]), [2])  # the first head's row of the one query
    return op.Expand(last, op.Concat(dim(op, key, 0), dim(op, key, 1), dim(op, key, 2), axis=0))


def half_lowest(mask) -> float:
    """Half the lowest value of an additive mask's dtype: below it a slot is masked (``ir/masks.visible``)."""
    import onnx_ir as ir

    lowest = -65504.0 if mask.dtype == ir.DataType.FLOAT16 else -3.3895313892515355e38  # fp16, else fp32/bf16
    return lowest / 2


def scaled(op, scores, scale: float, softcap: float | None):
    scores = op.Mul(scores, op.Constant(value_float=float(scale)))
    if softcap is not None:
        cap = op.Constant(value_float=float(softcap))
        scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
    return scores


def masked(op, scores, keep, axis: int):
    """Scores with dead slots at -inf; ``keep`` gains a size-1 axis at ``axis`` to broadcast."""
    if keep is None:
        return scores
    return op.Where(op.Unsqueeze(keep, [axis]), scores, op.Constant(value_float=float("-inf")))


def per_selecting_head(op, x, selecting_heads, same_heads: bool):
    """``[B, Hkv, S, ...]`` as ``[B, Hsel, S, ...]``: each selecting head reads its KV head."""
    if same_heads:
        return x
    b, hkv = dim(op, x, 0), dim(op, x, 1)
    rest = op.Shape(x, start=2)
    grown = op.Expand(op.Unsqueeze(x, [2]), op.Concat(b, hkv, op.Div(selecting_heads, hkv), rest, axis=0))
    return op.Reshape(grown, op.Concat(b, selecting_heads, rest, axis=0))


def grouped_query(op, query, heads):
    """The one-token query ``[B, Hq, 1, D]`` in fp32 as ``[B, heads, Hq / heads, D]``: each head's group of
    query heads together (``heads``: a 1-D size, e.g. ``dim(op, key, 1)``)."""
    b, d = dim(op, query, 0), dim(op, query, 3)
    return op.Reshape(op.Cast(query, to=FLOAT), op.Concat(b, heads, op.Constant(value_ints=[-1]), d, axis=0))


def attend_slots(op, query, key, value, keep, slots, scale: float, softcap: float | None,
                 same_heads: bool | None = None):
    """Attention over ``slots`` ``[B, Hsel, k]`` plus the step's own (last) slot, always live.
    ``same_heads``: whether ``Hsel`` is the KV heads (None: as far as the trace knows the shapes)."""
    b, hsel, d = dim(op, slots, 0), dim(op, slots, 1), dim(op, key, 3)
    same = same_heads
    if same is None:
        same = static_dim(slots, 1) is not None and static_dim(slots, 1) == static_dim(key, 1)
    one = op.Constant(value_ints=[1])
    own = op.Expand(op.Sub(dim(op, key, 2), one), op.Concat(b, hsel, one, axis=0))
    index = op.Concat(slots, own, axis=-1)  # [B, Hsel, k + 1]
    rows = op.Expand(op.Unsqueeze(index, [3]), op.Concat(b, hsel, dim(op, index, 2), d, axis=0))
    keys = op.Cast(op.GatherElements(per_selecting_head(op, key, hsel, same), rows, axis=2), to=FLOAT)
    values = op.Cast(op.GatherElements(per_selecting_head(op, value, hsel, same), rows, axis=2), to=FLOAT)
    grouped = grouped_query(op, query, hsel)
    scores = scaled(op, op.MatMul(grouped, op.Transpose(keys, perm=[0, 1, 3, 2])), scale, softcap)
    if keep is not None:
        chosen = op.GatherElements(per_selecting_head(op, keep, hsel, same), slots, axis=2)
        own_live = op.Cast(op.Expand(one, op.Concat(b, hsel, one, axis=0)), to=BOOL)
        keep = op.Concat(chosen, own_live, axis=-1)
    probs = op.Softmax(masked(op, scores, keep, 2), axis=-1)
    return op.CastLike(op.Reshape(op.MatMul(probs, values), op.Shape(query)), query)
