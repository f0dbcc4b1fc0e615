"""TokenSelect's graph op: decode attention over the first, the selected and the most recent tokens.

One op per full-attention layer; it scores the cache, selects and attends in the runtime (its
selection is its own: unlike TidalDecode, no layer reads another layer's choice, so no slots edge).
``inv_freq`` and ``rot_dim`` (from ``ir.rotary``) are given for contiguous positions: the keys read are
rotated again so that they sit at consecutive positions ending at the query's.
"""

from __future__ import annotations

import torch

from tokenpass.ir.op_registry import register_attention_op

TOKEN_SELECT_ATTENTION = "tokenpass::token_select_attention"
SELECTION_CACHE = "tokenselect.cache"  # cache note: layer -> (query that selected, selected slots)
LOOKUPS, HITS = "tokenselect.lookups", "tokenselect.hits"  # cache notes: selection-cache counters

torch.library.define(
    TOKEN_SELECT_ATTENTION,
    "(Tensor query, Tensor key_new, Tensor value_new, float scale, int layer, int n_init, int n_local, int top_k, "
    "float theta, float? softcap=None, Tensor? inv_freq=None, int rot_dim=0) -> Tensor",
)


@torch.library.register_fake(TOKEN_SELECT_ATTENTION)
def _token_select_attention_fake(query, key_new, value_new, scale, layer, n_init, n_local, top_k, theta,
                                 softcap=None, inv_freq=None, rot_dim=0):
    return query.new_empty((*query.shape[:-1], value_new.shape[-1]))


token_select_attention_op = torch.ops.tokenpass.token_select_attention.default
register_attention_op(token_select_attention_op,
                      {"query": "query", "key": "key_new", "value": "value_new", "scale": "scale", "layer": "layer",
                       "softcap": "softcap", "top_k": "top_k"}, reads_runtime_cache=True)
