"""How tokenpass's own ops become ONNX: one translation per op, written with standard ONNX ops only.

``torch.onnx.export`` takes these as its ``custom_translation_table``; an op without an entry cannot be
exported, and the exporter refuses it by name before any work. A method registers its ops' translations
beside the ops (as the core attention op does here), so the exporter never learns method names.

The translations are onnxscript code traced at export time: Python decides, from the op's constant
arguments (mask present, soft cap), which ONNX ops to emit. The exporter inlines the result, and
``ir/onnx_outline.py`` then moves each call's nodes into a ``tokenpass``-domain function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenpass.ir.ops import attention_op

_TRANSLATIONS: dict[torch._ops.OpOverload, Callable] = {}


def register_onnx_translation(op: torch._ops.OpOverload, translation: Callable) -> None:
    _TRANSLATIONS[op] = translation


def onnx_translations() -> dict[torch._ops.OpOverload, Callable]:
    return dict(_TRANSLATIONS)


def attention_onnx(query, key, value, mask=None, scale: float = 1.0, is_causal: bool = False, layer: int = 0,
                   softcap: float | None = None):
    """``tokenpass::attention`` (GQA, un-repeated KV heads) in standard ONNX ops, meaning what the torch
    reference means: query heads grouped onto their KV head by a reshape (no repeated K/V), masked
    scores replaced (not added: keys of padded positions may hold anything), and a query row with no
    key left gives zeros, as SDPA and ``attention_reference`` do, rather than NaN."""
    from onnxscript import opset18 as op

    b, hq = op.Shape(query, start=0, end=1), op.Shape(query, start=1, end=2)
    t, d = op.Shape(query, start=2, end=3), op.Shape(query, start=3, end=4)
    hkv = op.Shape(key, start=1, end=2)
    grouped = op.Reshape(query, op.Concat(b, hkv, op.Div(hq, hkv), t, d, axis=0))  # [B, Hkv, G, T, D]
    keys, values = op.Unsqueeze(key, [2]), op.Unsqueeze(value, [2])  # [B, Hkv, 1, S, D]
    scores = op.Mul(op.MatMul(grouped, op.Transpose(keys, perm=[0, 1, 2, 4, 3])), op.CastLike(scale, query))
    if softcap is not None:
        cap = op.CastLike(softcap, query)
        scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
    if mask is not None and not is_bool(mask):  # an additive mask (HF's eager path)
        scores = op.Add(scores, op.Unsqueeze(mask, [2]))
        mask = None
    keep = _keep(op, mask, is_causal, scores)
    if keep is not None:
        scores = op.Where(keep, scores, op.CastLike(float("-inf"), query))
    best = op.ReduceMax(scores, [-1], keepdims=1)  # -inf where a row keeps no key
    probs = op.Where(op.IsInf(best, detect_positive=0), op.CastLike(0.0, query), op.Softmax(scores, axis=-1))
    return op.Reshape(op.MatMul(probs, values), op.Shape(query))


def is_bool(value) -> bool:
    import onnx_ir as ir

    return getattr(value, "dtype", None) == ir.DataType.BOOL


def _keep(op, mask, is_causal: bool, scores):
    """Which scores survive, broadcastable to ``[B, Hkv, G, T, S]`` (``None``: all): a bool mask's True
    positions and, with ``is_causal``, ``j <= i``."""
    keep = None
    if mask is not None:
        keep = op.Unsqueeze(mask, [2])
    if is_causal:  # top-left aligned, as SDPA's is_causal
        ones = op.Expand(op.Constant(value_float=1.0), op.Shape(scores, start=-2))  # ConstantOfShape gives 0s
        causal = op.Cast(op.Trilu(ones, upper=0), to=9)
        keep = causal if keep is None else op.And(keep, causal)
    return keep


register_onnx_translation(attention_op, attention_onnx)
