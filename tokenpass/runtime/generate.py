"""Greedy generation over a step function, with the semantics of HF ``generate(do_sample=False)``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenpass.ir.capture import ModelSpec


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them (as HF does)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def greedy_generate(
    step: Callable,
    spec: ModelSpec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Prefill the prompt, then feed back the argmax token ``max_new_tokens`` times.

    Sequences that emitted ``eos_token_id`` keep emitting ``pad_token_id`` (default: the EOS id), as
    HF does, so the output stays one rectangular tensor.
    """
    batch = input_ids.shape[0]
    cache = spec.empty_cache(batch)
    positions = positions_from_mask(attention_mask)
    tokens, mask, new_ids = input_ids, attention_mask, input_ids
    finished = torch.zeros(batch, dtype=torch.bool)
    pad = pad_token_id if pad_token_id is not None else eos_token_id
    for _ in range(max_new_tokens):
        logits, cache = step(new_ids, mask, positions, cache)
        next_ids = logits[:, -1, :].argmax(-1)
        if eos_token_id is not None:
            next_ids = torch.where(finished, torch.full_like(next_ids, pad), next_ids)
            finished |= next_ids == eos_token_id
        new_ids = next_ids[:, None]
        tokens = torch.cat([tokens, new_ids], dim=1)
        mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
        positions = positions[:, -1:] + 1
        if eos_token_id is not None and bool(finished.all()):
            break
    return tokens
