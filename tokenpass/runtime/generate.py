"""The generation loop: prefill, then one decode step per new token, greedy or sampled like HF ``generate``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenpass.errors import TokenpassError


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them (as HF does)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


@dataclass
class Sampling:
    """Token choice: greedy, or sampling with HF's processor order (temperature, then top-k, then top-p)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.do_sample and self.temperature <= 0:
            raise TokenpassError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise TokenpassError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise TokenpassError(f"top_k must be >= 1, got {self.top_k}")
        self._generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The seeded generator, made on ``device`` (a CPU generator cannot draw for CUDA tensors) on first use."""
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Next tokens ``[B]`` from last-position logits ``[B, V]``."""
        if not self.do_sample:
            return logits.argmax(-1)
        scores = logits.float() / self.temperature
        if self.top_k is not None:
            kth = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            sorted_scores, order = scores.sort(dim=-1, descending=False)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - self.top_p
            drop[:, -1] = False  # always keep the most likely token
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        probs = scores.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator(probs.device)).squeeze(1)


def generate_tokens(
    session,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Prefill the prompt, then feed back the chosen token up to ``max_new_tokens`` times (``session``: a
    ``runtime.session.Session`` or ``ExplicitSession``, whose policies run after every step).

    Sequences that emitted ``eos_token_id`` keep emitting ``pad_token_id`` (default: the EOS id) and the
    loop stops once all have, as HF does, so the output stays one rectangular tensor. Every buffer is made
    on ``input_ids``' device (the model's: ``OptimizedModel`` moves the prompt there).
    """
    batch, device = input_ids.shape[0], input_ids.device
    positions = positions_from_mask(attention_mask)
    tokens, new_ids, valid = input_ids, input_ids, attention_mask
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    ones = torch.ones((batch, 1), dtype=torch.long, device=device)  # each decode step's token is real
    pad = pad_token_id if pad_token_id is not None else eos_token_id
    for _ in range(max_new_tokens):
        logits = session.step(new_ids, valid, positions, last_only=True)
        next_ids = sampling.choose(logits[:, -1, :])
        if eos_token_id is not None:
            next_ids = torch.where(finished, torch.full_like(next_ids, pad), next_ids)
            finished |= next_ids == eos_token_id
        if streamer is not None:
            streamer(next_ids)
        new_ids, valid = next_ids[:, None], ones
        tokens = torch.cat([tokens, new_ids], dim=1)
        positions = positions[:, -1:] + 1
        if eos_token_id is not None and bool(finished.all()):
            break
    return tokens
