"""Exact torch reference of attention over a runtime KV cache (the CPU path and the kernels' oracle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenpass.kernels.attention_ref import expand_kv_heads


def step_mask(valid: torch.Tensor | None, new_tokens: int, slots: int) -> torch.Tensor | None:
    """``[B, H_kv, T, S]`` visibility: a live slot, not after the query (the last ``T`` slots are the step's).

    Each query also sees its own slot, so a padding query never has an empty row (which would give NaN
    that leaks through ``0 * NaN`` into real rows).
    """
    if valid is None and new_tokens == 1:
        return None
    query_slot = torch.arange(slots - new_tokens, slots, device=valid.device if valid is not None else "cpu")
    slot = torch.arange(slots, device=query_slot.device)
    causal = slot[None, :] <= query_slot[:, None]  # [T, S]
    if valid is None:
        return causal[None, None]
    return (valid[:, :, None, :] & causal) | (slot[None, :] == query_slot[:, None])


def grouped_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``[B,Hq,T,D]`` queries over ``[B,Hkv,S,D]`` keys without repeating KV heads.

    The ``G`` query heads sharing a KV head are folded into the query axis, so SDPA reads each KV head
    once instead of materialising ``G`` copies (HF's ``repeat_kv``).
    """
    b, hq, t, d = query.shape
    hkv = keys.shape[1]
    group = hq // hkv
    q = query.reshape(b, hkv, group * t, d)
    if mask is not None:
        mask = mask[:, :, None].expand(b, mask.shape[1], group, t, mask.shape[-1]).reshape(b, -1, group * t, mask.shape[-1])
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, t, values.shape[-1])


def cache_attention_reference(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention of the step's ``T`` queries over ``S`` cache slots, the last ``T`` being the step's own.

    Decode folds query groups (no KV copy). A multi-token step whose heads all see the same slots (no
    per-head eviction) uses one ``[B, 1, T, S]`` mask, or SDPA's causal kernel when nothing is masked,
    rather than a per-head mask that would cost ``H * T * S`` bytes.
    """
    t, s = query.shape[2], keys.shape[2]
    if t == 1 or (valid is not None and not bool((valid == valid[:, :1]).all())):
        return grouped_attention(query, keys, values, step_mask(valid, t, s), scale)
    # Repeating KV heads costs O(S) here against O(T * S) attention, and keeps SDPA on its fused CPU
    # kernel, which ``enable_gqa`` would leave for the math path (a full score matrix per head).
    keys, values = expand_kv_heads(keys, query.shape[1]), expand_kv_heads(values, query.shape[1])
    if valid is None and s == t:
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale)
    mask = step_mask(valid[:, :1] if valid is not None else None, t, s)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
