"""The custom ops tokenpass graphs are rewritten into (the IR's vocabulary beyond aten).

``tokenpass::attention`` is the one attention op every captured attention site is canonicalised to:
grouped-query attention with un-repeated KV heads, an optional mask, an explicit scale and the decoder
layer it belongs to. Method passes (sparse attention, eviction) rewrite this one op instead of each
model family's way of spelling attention. A fake implementation keeps rewritten graphs exportable.
"""

from __future__ import annotations

import torch

from tokenpass.kernels.attention_ref import attention_reference

ATTENTION = "tokenpass::attention"


@torch.library.custom_op(ATTENTION, mutates_args=())
def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    layer: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of decoder layer ``layer``; ``key``/``value`` keep their ``H_kv`` heads (GQA).

    ``softcap`` (``None``: none) caps the scaled logits as ``tanh(w / softcap) * softcap`` before the mask.
    """
    return attention_reference(query, key, value, mask, scale, is_causal, softcap)


@attention.register_fake
def _attention_fake(query, key, value, mask, scale, is_causal, layer, softcap=None):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


attention_op = torch.ops.tokenpass.attention.default


# Ops whose implementations live in the runtime (they read state only the runtime has, such as its KV
# cache). The IR declares their schema and shape rule so graphs holding them can be built and inspected.
CACHED_ATTENTION = "tokenpass::cached_attention"
torch.library.define(
    CACHED_ATTENTION, "(Tensor query, Tensor key_new, Tensor value_new, float scale, int layer) -> Tensor"
)


@torch.library.register_fake(CACHED_ATTENTION)
def _cached_attention_fake(query, key_new, value_new, scale, layer):
    return query.new_empty((*query.shape[:-1], value_new.shape[-1]))


cached_attention_op = torch.ops.tokenpass.cached_attention.default
RUNTIME_CACHE = "<runtime cache>"

# Sparse decode attention (TidalDecode and the selection methods after it). A selection layer attends
# densely and also returns, per head, the cache slots its query attended to most; later layers attend
# only to those slots (plus their own new token). The slots tensor is an explicit data edge in the graph.
# Sparse-output selection only: ``score_dtype`` ranks with a copy of the keys in that dtype, which the
# runtime cache keeps in step (bf16 halves the bytes ranking reads from an fp32 cache), and
# ``score_channels`` (0: all) with that many of each key's channels, those the query weighs most.
SELECTION_ATTENTION = "tokenpass::selection_attention"
SPARSE_ATTENTION = "tokenpass::sparse_attention"
torch.library.define(
    SELECTION_ATTENTION,
    "(Tensor query, Tensor key_new, Tensor value_new, float scale, int layer, int top_k, bool per_kv_head, "
    "bool sparse_output, ScalarType? score_dtype=None, int score_channels=0) -> (Tensor, Tensor)",
)
torch.library.define(
    SPARSE_ATTENTION,
    "(Tensor query, Tensor key_new, Tensor value_new, Tensor slots, float scale, int layer) -> Tensor",
)


@torch.library.register_fake(SELECTION_ATTENTION)
def _selection_attention_fake(query, key_new, value_new, scale, layer, top_k, per_kv_head, sparse_output,
                              score_dtype=None, score_channels=0):
    heads = key_new.shape[1] if per_kv_head else query.shape[1]
    slots = query.new_empty((query.shape[0], heads, top_k), dtype=torch.long)
    return query.new_empty((*query.shape[:-1], value_new.shape[-1])), slots


@torch.library.register_fake(SPARSE_ATTENTION)
def _sparse_attention_fake(query, key_new, value_new, slots, scale, layer):
    return query.new_empty((*query.shape[:-1], value_new.shape[-1]))


selection_attention_op = torch.ops.tokenpass.selection_attention.default
sparse_attention_op = torch.ops.tokenpass.sparse_attention.default
