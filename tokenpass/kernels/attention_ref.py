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
    softcap: float | None = None,
) -> torch.Tensor:
    """Grouped-query attention ``[B,Hq,T,D] x [B,Hkv,S,D] -> [B,Hq,T,D]``, bit-identical to the captured model.

    One meaning, two formulas, chosen so that canonicalisation can be checked for equality rather than
    closeness whichever attention implementation the model was captured with:

    * no ``softcap`` and a bool mask (or none): SDPA, with KV heads expanded exactly as HF's
      ``repeat_kv`` does; this is what HF's sdpa path runs (its masks are bool or absent);
    * a ``softcap`` (Gemma 2's ``tanh(w / c) * c``), which SDPA cannot express, or a float (additive)
      mask, which is what HF's eager path builds and its sdpa path never does: the eager formula,
      op for op (``eager_attention_reference``).

    Measured on tiny float32 models (llama, gpt2; left-padded batch), logits of eager-captured models
    canonicalised and run with SDPA differ from HF eager by up to 2.4e-7; with the eager formula they
    are equal. Both formulas compute the same function (masks follow SDPA's conventions in both), so
    the choice changes rounding only, and the runtime's cache kernels, not this function, run a
    lowered model.
    """
    if softcap is not None or (mask is not None and mask.is_floating_point()):
        return eager_attention_reference(query, key, value, mask, scale, is_causal, softcap)
    heads = query.shape[1]
    return F.scaled_dot_product_attention(
        query,
        expand_kv_heads(key, heads),
        expand_kv_heads(value, heads),
        attn_mask=mask,
        scale=scale,
        is_causal=is_causal,
    )


def eager_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention as HF's ``eager_attention_forward`` computes it, op for op (so bit-identical to it).

    ``w = (q @ k^T) * scale``; ``w = tanh(w / softcap) * softcap``; ``w = w + mask``; softmax in
    float32, cast back; ``@ v``. Masks follow SDPA's conventions so the op means one thing whichever
    path runs it: a float mask is added, a bool mask keeps the positions that are True, ``is_causal``
    keeps ``j <= i`` (top-left aligned), and a query row with nothing left to attend to gives zeros.
    """
    heads = query.shape[1]
    key, value = expand_kv_heads(key, heads), expand_kv_heads(value, heads)
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if is_causal:
        t, s = scores.shape[-2:]
        keep = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if mask is not None or is_causal:  # rows masked to -inf throughout: zeros, as SDPA gives, not NaN
        probs = probs.masked_fill(scores.isneginf().all(dim=-1, keepdim=True), 0.0)
    return torch.matmul(probs.to(query.dtype), value)
