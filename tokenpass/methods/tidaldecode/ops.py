"""TidalDecode's graph ops: a selection layer and a sparse layer, declared and registered with roles.

A selection layer attends (densely, or over its own choice with ``sparse_output``) and returns, per
head, the cache slots its query attended to most; later layers attend only to those slots plus their
own new token. The slots tensor is an explicit data edge in the graph (role ``slots``), which the
inspector draws. ``score_dtype``/``score_channels`` (sparse-output selection only) rank with the
declared per-slot state ``SCORE_KEYS``: a channel-major copy of the keys the runtime cache keeps in
step, optionally in a narrower dtype, of which ``score_channels`` (0: all) rows are read.
"""

from __future__ import annotations

import torch

from tokenpass.ir.op_registry import register_attention_op

SELECTION_ATTENTION = "tokenpass::selection_attention"
SPARSE_ATTENTION = "tokenpass::sparse_attention"
SCORE_KEYS = "tidaldecode.score_keys"  # the per-slot state selection layers rank with

torch.library.define(
    SELECTION_ATTENTION,
    "(Tensor query, Tensor key_new, Tensor value_new, float scale, int layer, int top_k, bool per_kv_head, "
    "bool sparse_output, ScalarType? score_dtype=None, int score_channels=0, float? softcap=None) -> (Tensor, Tensor)",
)
torch.library.define(
    SPARSE_ATTENTION,
    "(Tensor query, Tensor key_new, Tensor value_new, Tensor slots, float scale, int layer, float? softcap=None) "
    "-> Tensor",
)


@torch.library.register_fake(SELECTION_ATTENTION)
def _selection_attention_fake(query, key_new, value_new, scale, layer, top_k, per_kv_head, sparse_output,
                              score_dtype=None, score_channels=0, softcap=None):
    heads = key_new.shape[1] if per_kv_head else query.shape[1]
    slots = query.new_empty((query.shape[0], heads, top_k), dtype=torch.long)
    return query.new_empty((*query.shape[:-1], value_new.shape[-1])), slots


@torch.library.register_fake(SPARSE_ATTENTION)
def _sparse_attention_fake(query, key_new, value_new, slots, scale, layer, softcap=None):
    return query.new_empty((*query.shape[:-1], value_new.shape[-1]))


selection_attention_op = torch.ops.tokenpass.selection_attention.default
sparse_attention_op = torch.ops.tokenpass.sparse_attention.default
_CACHE_ROLES = {"query": "query", "key": "key_new", "value": "value_new", "scale": "scale", "layer": "layer",
                "softcap": "softcap"}
register_attention_op(selection_attention_op, {**_CACHE_ROLES, "top_k": "top_k"}, reads_runtime_cache=True)
register_attention_op(sparse_attention_op, {**_CACHE_ROLES, "slots": "slots"}, reads_runtime_cache=True)
