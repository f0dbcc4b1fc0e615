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
) -> torch.Tensor:
    """Attention of decoder layer ``layer``; ``key``/``value`` keep their ``H_kv`` heads (GQA)."""
    return attention_reference(query, key, value, mask, scale, is_causal)


@attention.register_fake
def _attention_fake(query, key, value, mask, scale, is_causal, layer):
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
