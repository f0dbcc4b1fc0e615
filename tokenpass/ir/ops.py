"""The core attention ops tokenpass graphs are rewritten into (the IR's vocabulary beyond aten).

``tokenpass::attention`` is the one attention op every captured attention site is canonicalised to:
grouped-query attention with un-repeated KV heads, an optional mask, an explicit scale and the decoder
layer it belongs to. ``tokenpass::cached_attention`` is the same attention reading the runtime-owned KV
cache. Method passes rewrite these instead of each model family's way of spelling attention; a method's
own ops are defined and registered in the method's package (``tokenpass/methods/``). Every op here, and
``aten.scaled_dot_product_attention``, is registered in ``op_registry`` with its argument roles.
"""

from __future__ import annotations

import torch

from tokenpass.ir.op_registry import register_attention_op
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
# ``window`` > 0: the layer sees only keys fewer than ``window`` positions behind the query (sliding
# window); ``softcap``: scores pass through ``softcap * tanh(s / softcap)`` before the softmax.
torch.library.define(
    CACHED_ATTENTION,
    "(Tensor query, Tensor key_new, Tensor value_new, float scale, int layer, float? softcap=None, int window=0) "
    "-> Tensor",
)


@torch.library.register_fake(CACHED_ATTENTION)
def _cached_attention_fake(query, key_new, value_new, scale, layer, softcap=None, window=0):
    return query.new_empty((*query.shape[:-1], value_new.shape[-1]))


cached_attention_op = torch.ops.tokenpass.cached_attention.default
RUNTIME_CACHE = "<runtime cache>"
SDPA = torch.ops.aten.scaled_dot_product_attention.default

register_attention_op(
    SDPA,
    {"query": "query", "key": "key", "value": "value", "mask": "attn_mask", "is_causal": "is_causal", "scale": "scale"},
    name="aten.scaled_dot_product_attention",
)
register_attention_op(
    attention_op,
    {"query": "query", "key": "key", "value": "value", "mask": "mask", "scale": "scale", "is_causal": "is_causal",
     "layer": "layer", "softcap": "softcap"},
)
CACHE_ROLES = {"query": "query", "key": "key_new", "value": "value_new", "scale": "scale", "layer": "layer",
               "softcap": "softcap", "window": "window"}
register_attention_op(cached_attention_op, CACHE_ROLES, reads_runtime_cache=True)

