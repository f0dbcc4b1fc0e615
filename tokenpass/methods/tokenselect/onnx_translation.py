"""TokenSelect's explicit-cache op in standard ONNX ops (CumSum, TopK, ScatterElements, Softmax, MatMul).

The same arithmetic as ``explicit_ops.explicit_token_select_attention``: positions counted over live
slots, the fixed first/last positions, every query head's softmax over the candidates summed into one
vote per slot, the ``top_k`` best candidates, then attention over the chosen slots plus the step's own
(``ir/onnx_slots.attend_slots``, shared with TidalDecode's sparse layers).
"""

from __future__ import annotations

from tokenpass.ir.onnx_slots import BOOL, FLOAT, INT64, attend_slots, dim, grouped_query, live, masked, scaled
from tokenpass.ir.onnx_translations import register_onnx_translation
from tokenpass.methods.tokenselect.explicit_ops import explicit_token_select_op


def _votes(op, query, key, candidates, scale: float, softcap: float | None):
    """``[B, S]``: each query head's softmax over the candidate slots, summed over heads (``soft_vote``)."""
    grouped = grouped_query(op, query, dim(op, key, 1))
    scores = scaled(op, op.MatMul(grouped, op.Transpose(op.Cast(key, to=FLOAT), perm=[0, 1, 3, 2])), scale, softcap)
    probs = op.Softmax(masked(op, scores, op.Unsqueeze(candidates, [1]), 1), axis=-1)  # [B, Hkv, G, S]
    return op.ReduceSum(op.Where(op.IsNaN(probs), op.Constant(value_float=0.0), probs), [1, 2], keepdims=0)


def _chosen(op, query, key, alive, scale: float, softcap: float | None, n_init: int, n_local: int, top_k: int):
    """``[B, S]`` bool: the fixed slots and the ``top_k`` best-voted candidates (``explicit_ops.chosen_slots``)."""
    positions = op.Sub(op.CumSum(op.Cast(alive, to=INT64), op.Constant(value_int=1)), op.Constant(value_int=1))
    last = op.Slice(positions, [-1], [2**62], [1])
    ends = op.Or(op.Less(positions, op.Constant(value_int=n_init)),
                 op.Greater(positions, op.Sub(last, op.Constant(value_int=n_local))))
    fixed = op.And(alive, ends)
    candidates = op.And(alive, op.Not(fixed))
    ranked = op.Where(candidates, _votes(op, query, key, candidates, scale, softcap),
                      op.Constant(value_float=float("-inf")))
    k = op.Min(op.Constant(value_ints=[top_k]), dim(op, ranked, 1))
    selected = op.TopK(ranked, k, axis=-1)[1]
    picked = op.Cast(op.GatherElements(candidates, selected, axis=1), to=INT64)
    scattered = op.ScatterElements(op.Cast(fixed, to=INT64), selected, picked, axis=1, reduction="max")
    return op.Cast(scattered, to=BOOL)


def explicit_token_select_onnx(query, key, value, mask=None, scale: float = 1.0, layer: int = 0, n_init: int = 4,
                               n_local: int = 128, top_k: int = 512, softcap: float | None = None):
    from onnxscript import opset18 as op

    b, hkv, s = dim(op, key, 0), dim(op, key, 1), dim(op, key, 2)
    keep = live(op, mask, key)
    if keep is None:
        alive = op.Expand(op.Cast(op.Constant(value_ints=[1]), to=BOOL), op.Concat(b, s, axis=0))  # [B, S]
    else:
        alive = op.Squeeze(op.Slice(keep, [0], [1], [1]), [1])
    chosen = _chosen(op, query, key, alive, scale, softcap, n_init, n_local, top_k)
    count = op.Min(op.Constant(value_ints=[n_init + top_k + n_local - 1]), op.Sub(s, op.Constant(value_ints=[1])))
    past = op.Slice(chosen, [0], [-1], [1])
    slots = op.TopK(op.Cast(past, to=FLOAT), count, axis=-1)[1]  # chosen ones first; extras are masked
    wide = op.Concat(b, hkv, count, axis=0)
    read = op.Expand(op.Unsqueeze(chosen, [1]), op.Concat(b, hkv, s, axis=0))
    slots = op.Expand(op.Unsqueeze(slots, [1]), wide)  # one choice for every KV head
    return attend_slots(op, query, key, value, read, slots, scale, softcap, same_heads=True)


register_onnx_translation(explicit_token_select_op, explicit_token_select_onnx)
