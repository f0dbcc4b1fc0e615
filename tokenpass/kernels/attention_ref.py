"""Exact torch reference of the canonical attention op: what every attention kernel is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_kv_heads(kv: torch.Tensor, num_query_heads: int) -> torch.Tensor:
    """Repeat each KV head for its query group (query head h reads KV head h // group, as in HF)."""
    group = num_query_heads // kv.shape[1]
    return kv if group == 1 else kv.repeat_interleave(group, dim=1)


def attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
) -> torch.Tensor:
    """Grouped-query attention ``[B,Hq,T,D] x [B,Hkv,S,D] -> [B,Hq,T,D]`` via SDPA.

    Expanding KV heads exactly as HF's ``repeat_kv`` does keeps results bit-identical to the captured
    model, which is what lets canonicalisation be checked for equality rather than closeness.
    """
    heads = query.shape[1]
    return F.scaled_dot_product_attention(
        query,
        expand_kv_heads(key, heads),
        expand_kv_heads(value, heads),
        attn_mask=mask,
        scale=scale,
        is_causal=is_causal,
    )
