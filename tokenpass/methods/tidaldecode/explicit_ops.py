"""TidalDecode's ops over explicit KV tensors: the method on graphs whose cache is step inputs and outputs.

A graph not lowered onto the runtime cache (``optimize(..., lower=False)``, an ONNX export) carries each
layer's keys and values as tensors, ``cat(past, new)``, with the model's own mask. These ops are the
selection and sparse layers on that form: the same arithmetic as the runtime ops (the kernel references
in ``kernels/sparse_attention_ref.py``), with the slots' liveness read off the mask instead of the
runtime cache's validity. The ranking approximation reads the chosen channels of the keys themselves,
so no per-slot state is kept between steps and the standard past/present cache is the whole state.

Shapes: one query token ``[B, Hq, 1, D]``; ``key``/``value`` ``[B, Hkv, S, D]`` whose last slot is the
step's own token; ``mask`` (bool, or additive float) ``[B, 1|H, 1, S]`` or None.
"""

from __future__ import annotations

import torch

from tokenpass.ir.masks import one_query_liveness
from tokenpass.ir.op_registry import register_attention_op
from tokenpass.kernels.sparse_attention_ref import (
    decode_scores,
    ranking_scores,
    selection_attention_reference,
    sparse_attention_reference,
    top_slots,
)

EXPLICIT_SELECTION = "tokenpass::explicit_selection_attention"
EXPLICIT_SPARSE = "tokenpass::explicit_sparse_attention"

torch.library.define(
    EXPLICIT_SELECTION,
    "(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale, int layer, int top_k, bool per_kv_head, "
    "bool sparse_output, ScalarType? score_dtype=None, int score_channels=0, float? softcap=None) -> (Tensor, Tensor)",
)
torch.library.define(
    EXPLICIT_SPARSE,
    "(Tensor query, Tensor key, Tensor value, Tensor? mask, Tensor slots, float scale, int layer, float? softcap=None) "
    "-> Tensor",
)


@torch.library.register_fake(EXPLICIT_SELECTION)
def _selection_fake(query, key, value, mask, scale, layer, top_k, per_kv_head, sparse_output, score_dtype=None,
                    score_channels=0, softcap=None):
    heads = key.shape[1] if per_kv_head else query.shape[1]
    chosen = torch.sym_min(top_k, key.shape[2] - 1)
    slots = query.new_empty((query.shape[0], heads, chosen), dtype=torch.long)
    return query.new_empty((*query.shape[:-1], value.shape[-1])), slots


@torch.library.register_fake(EXPLICIT_SPARSE)
def _sparse_fake(query, key, value, mask, slots, scale, layer, softcap=None):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


@torch.library.impl(EXPLICIT_SELECTION, "CompositeExplicitAutograd")
def explicit_selection_attention(query, key, value, mask, scale, layer, top_k, per_kv_head, sparse_output,
                                 score_dtype=None, score_channels=0, softcap=None):
    valid = one_query_liveness(mask, key)
    if not sparse_output:
        out, slots = selection_attention_reference(query, key, value, valid, scale, top_k, per_kv_head, False, softcap)
        return out.contiguous(), slots.contiguous()
    if score_dtype is None and not score_channels:
        scores = decode_scores(query, key, valid, scale, softcap)
    else:  # the runtime's channel-major ranking copy, here a view of the keys themselves
        score_keys = key.to(score_dtype or key.dtype).transpose(-1, -2)
        scores = ranking_scores(query, score_keys, valid, scale, score_channels, softcap)
    slots = top_slots(scores, top_k, per_kv_head).contiguous()
    return sparse_attention_reference(query, key, value, valid, slots, scale, softcap).contiguous(), slots


@torch.library.impl(EXPLICIT_SPARSE, "CompositeExplicitAutograd")
def explicit_sparse_attention(query, key, value, mask, slots, scale, layer, softcap=None):
    valid = one_query_liveness(mask, key)
    return sparse_attention_reference(query, key, value, valid, slots, scale, softcap).contiguous()


explicit_selection_op = torch.ops.tokenpass.explicit_selection_attention.default
explicit_sparse_op = torch.ops.tokenpass.explicit_sparse_attention.default
_ROLES = {"query": "query", "key": "key", "value": "value", "mask": "mask", "scale": "scale", "layer": "layer",
          "softcap": "softcap"}
register_attention_op(explicit_selection_op, {**_ROLES, "top_k": "top_k"})
register_attention_op(explicit_sparse_op, {**_ROLES, "slots": "slots"})
