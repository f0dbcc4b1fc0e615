"""Scored attention over explicit KV tensors: KV eviction on graphs whose cache is step inputs and outputs.

A graph not lowered onto the runtime cache (an ONNX export) carries each layer's keys and values as
``cat(past, new)`` with the model's mask. This op attends as the canonical attention does and returns,
from the same scores, what the explicit eviction policy (``explicit_policy.py``) accumulates:

* a prompt step (``summed``): each slot's contribution ``sum over the real queries and the KV head's query
  heads of softmax(x / tau)`` ``[B, Hkv, S]`` (prompts are scored at ``tau_init``, with no noise);
* a decode step: the one query's masked scaled scores ``x`` ``[B, Hkv, G, S]`` (dead slots at -inf), which
  the policy finishes with the runtime's own ``score_contribution`` (the step's temperature, and the
  Gumbel noise keyed by the positions the policy keeps), as the runtime's CUDA decode path does.

Real queries are the step's non-padding tokens: the last ``T`` columns of the step's ``attention_mask``.
"""

from __future__ import annotations

import torch

from tokenpass.ir.masks import visible
from tokenpass.ir.op_registry import register_attention_op
from tokenpass.kernels.cache_attention_ref import soft_cap
from tokenpass.kernels.scored_attention_ref import scored_attention_reference

EXPLICIT_SCORED_ATTENTION = "tokenpass::explicit_scored_attention"

torch.library.define(
    EXPLICIT_SCORED_ATTENTION,
    "(Tensor query, Tensor key, Tensor value, Tensor? mask, Tensor token_mask, float scale, int layer, "
    "float? softcap=None, bool summed=True, float tau=1.0) -> (Tensor, Tensor)",
)


@torch.library.register_fake(EXPLICIT_SCORED_ATTENTION)
def _fake(query, key, value, mask, token_mask, scale, layer, softcap=None, summed=True, tau=1.0):
    b, hkv, s = key.shape[:3]
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    if summed:
        return out, query.new_empty((b, hkv, s), dtype=torch.float32)
    return out, query.new_empty((b, hkv, query.shape[1] // hkv, s), dtype=torch.float32)


def visibility(mask: torch.Tensor | None, t: int, s: int, device: torch.device) -> torch.Tensor:
    """``[B|1, 1, T, S]`` bool: what each query sees, from the model's mask (checked causal + padding on
    every head, so the first head speaks for all) or, with none, causal with the past in front."""
    if mask is None:
        return torch.ones(t, s, dtype=torch.bool, device=device).tril(s - t)[None, None]
    return visible(mask)[:, :1]


def decode_scores(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, scale: float,
                  softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One query's output ``[B, Hq, 1, D]`` and masked scaled scores ``[B, Hkv, G, S]`` (fp32)."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    x = torch.matmul(query.float().view(b, hkv, hq // hkv, d), key.float().transpose(-1, -2))
    x = soft_cap(x * scale, softcap).masked_fill(~keep, float("-inf"))
    out = torch.matmul(x.softmax(-1), value.float()).view(b, hq, 1, -1)
    return out.to(query.dtype), x


@torch.library.impl(EXPLICIT_SCORED_ATTENTION, "CompositeExplicitAutograd")
def explicit_scored_attention(query, key, value, mask, token_mask, scale, layer, softcap=None, summed=True, tau=1.0):
    b, hkv, s, _ = key.shape
    t = query.shape[2]
    keep = visibility(mask, t, s, key.device).expand(b, hkv, t, s)
    if not summed:
        out, scores = decode_scores(query, key, value, keep[:, :, 0, None, :], scale, softcap)
        return out.contiguous(), scores
    real = token_mask[:, -t:] != 0
    keep = keep | ~real[:, None, :, None]  # a padding query sees every slot: no NaN row (it counts for nothing)
    out, contribution = scored_attention_reference(query, key, value, keep, scale, query_valid=real, tau=tau,
                                                   softcap=softcap)
    return out.contiguous(), contribution


explicit_scored_attention_op = torch.ops.tokenpass.explicit_scored_attention.default
register_attention_op(explicit_scored_attention_op,
                      {"query": "query", "key": "key", "value": "value", "mask": "mask", "scale": "scale",
                       "layer": "layer", "softcap": "softcap"})
