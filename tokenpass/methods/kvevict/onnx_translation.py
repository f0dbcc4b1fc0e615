"""``explicit_scored_attention`` in standard ONNX ops (MatMul, Softmax, ReduceSum, Where): the same
arithmetic as ``explicit_ops.py``, so the ONNX runtime's eviction policy accumulates what the torch
runtime's explicit session accumulates.

Query heads are grouped onto their KV head by a reshape (``[B, Hkv, G, T, D]``), scores are fp32,
dead slots -inf; a padding query sees every slot (its row counts for nothing and is never NaN).
"""

from __future__ import annotations

from tokenpass.ir.onnx_slots import BOOL, FLOAT, dim, half_lowest, scaled
from tokenpass.ir.onnx_translations import is_bool, register_onnx_translation
from tokenpass.methods.kvevict.explicit_ops import explicit_scored_attention_op


def _keep(op, mask, scores):
    """``[B|1, 1, 1, T, S]`` bool: the model's mask (first head), or causal with the past in front."""
    if mask is None:
        t, s = op.Shape(scores, start=-2, end=-1), op.Shape(scores, start=-1)
        ones = op.Expand(op.Constant(value_float=1.0), op.Concat(t, s, axis=0))
        return op.Cast(op.Trilu(ones, op.Squeeze(op.Sub(s, t)), upper=0), to=BOOL)
    keep = mask if is_bool(mask) else op.Greater(mask, op.CastLike(half_lowest(mask), mask))
    return op.Unsqueeze(op.Slice(keep, [0], [1], [1]), [2])


def explicit_scored_attention_onnx(query, key, value, mask, token_mask, scale: float = 1.0, layer: int = 0,
                                   softcap: float | None = None, summed: bool = True, tau: float = 1.0):
    from onnxscript import opset18 as op

    b, hq, t, d = dim(op, query, 0), dim(op, query, 1), dim(op, query, 2), dim(op, query, 3)
    hkv = dim(op, key, 1)
    grouped = op.Reshape(op.Cast(query, to=FLOAT), op.Concat(b, hkv, op.Div(hq, hkv), t, d, axis=0))
    keys = op.Unsqueeze(op.Cast(key, to=FLOAT), [2])  # [B, Hkv, 1, S, D]
    x = scaled(op, op.MatMul(grouped, op.Transpose(keys, perm=[0, 1, 2, 4, 3])), scale, softcap)  # [B,Hkv,G,T,S]
    keep = _keep(op, mask, x)
    if summed:
        real = op.Cast(op.Slice(token_mask, op.Neg(t), [2**62], [1]), to=BOOL)  # [B, T]
        padding = op.Unsqueeze(op.Not(real), [1, 2, 4])  # [B, 1, 1, T, 1]
        keep = op.Or(keep, padding)
    x = op.Where(keep, x, op.Constant(value_float=float("-inf")))
    probs = op.Softmax(x, axis=-1)
    out = op.CastLike(op.Reshape(op.MatMul(probs, op.Unsqueeze(op.Cast(value, to=FLOAT), [2])), op.Shape(query)), query)
    if not summed:
        return out, op.Squeeze(x, [3])  # [B, Hkv, G, S]
    if tau != 1.0:
        probs = op.Softmax(op.Div(x, op.Constant(value_float=float(tau))), axis=-1)
    counted = op.Where(op.Unsqueeze(real, [1, 2, 4]), probs, op.Constant(value_float=0.0))
    return out, op.ReduceSum(counted, [2, 3], keepdims=0)


register_onnx_translation(explicit_scored_attention_op, explicit_scored_attention_onnx)
