"""TokenSelect's op over explicit KV tensors: the method on graphs whose cache is step inputs and outputs.

A graph not lowered onto the runtime cache (``optimize(..., lower=False)``, an ONNX export) carries each
layer's keys and values as ``cat(past, new)`` with the model's mask. This op is the runtime op's
selection without the selection cache (``theta=None``: every step selects, so nothing is kept between
steps): slot liveness from the mask, positions counted over live slots (what the runtime's positions
are for left padding), the first ``n_init`` and last ``n_local`` positions always read, and the
``top_k`` soft-voted candidates between them. It always attends over its choice; where the three parts
cover every live token that choice is every live token, as the runtime's dense shortcut reads.
"""

from __future__ import annotations

import torch

from tokenpass.ir.masks import one_query_liveness
from tokenpass.ir.op_registry import register_attention_op
from tokenpass.kernels.sparse_attention_ref import sparse_attention_reference
from tokenpass.kernels.token_select_ref import soft_vote

EXPLICIT_TOKEN_SELECT = "tokenpass::explicit_token_select_attention"

torch.library.define(
    EXPLICIT_TOKEN_SELECT,
    "(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale, int layer, int n_init, int n_local, "
    "int top_k, float? softcap=None) -> Tensor",
)


@torch.library.register_fake(EXPLICIT_TOKEN_SELECT)
def _fake(query, key, value, mask, scale, layer, n_init, n_local, top_k, softcap=None):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def chosen_slots(live: torch.Tensor, votes_of, n_init: int, n_local: int, top_k: int) -> torch.Tensor:
    """``[B, S]`` slots read: live ones among the first ``n_init`` and last ``n_local`` positions, and the
    ``top_k`` live candidates between them with the most votes (``votes_of(candidates)`` -> ``[B, S]``)."""
    positions = live.long().cumsum(-1) - 1
    last = positions[:, -1:]
    fixed = live & ((positions < n_init) | (positions > last - n_local))
    candidates = live & ~fixed
    ranked = votes_of(candidates).masked_fill(~candidates, float("-inf"))
    selected = ranked.topk(min(top_k, ranked.shape[-1]), dim=-1).indices
    return fixed | torch.zeros_like(fixed).scatter_(1, selected, candidates.gather(1, selected))


@torch.library.impl(EXPLICIT_TOKEN_SELECT, "CompositeExplicitAutograd")
def explicit_token_select_attention(query, key, value, mask, scale, layer, n_init, n_local, top_k, softcap=None):
    b, hkv, s, _ = key.shape
    valid = one_query_liveness(mask, key)
    live = torch.ones(b, s, dtype=torch.bool, device=key.device) if valid is None else valid[:, 0]
    chosen = chosen_slots(live, lambda candidates: soft_vote(query, key, candidates, scale, softcap),
                          n_init, n_local, top_k)
    count = min(n_init + top_k + n_local - 1, s - 1)  # past slots read (the own token comes on top)
    slots = chosen[:, :-1].float().topk(count, dim=-1).indices  # chosen ones first; extras are masked
    read = chosen[:, None, :].expand(-1, hkv, -1)
    out = sparse_attention_reference(query, key, value, read, slots[:, None, :].expand(-1, hkv, -1), scale, softcap)
    return out.contiguous()


explicit_token_select_op = torch.ops.tokenpass.explicit_token_select_attention.default
register_attention_op(explicit_token_select_op,
                      {"query": "query", "key": "key", "value": "value", "mask": "mask", "scale": "scale",
                       "layer": "layer", "softcap": "softcap", "top_k": "top_k"})
