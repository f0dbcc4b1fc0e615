"""``OptimizedModel``: the captured, rewritten graphs of a model behind a familiar forward/generate API."""

from __future__ import annotations

import torch

from tokenpass.errors import TokenpassError
from tokenpass.ir.capture import ModelSpec
from tokenpass.ir.graph import TokenGraph
from tokenpass.passes.base import PassResult
from tokenpass.runtime.generate import greedy_generate, positions_from_mask

Cache = tuple[list[torch.Tensor], list[torch.Tensor]]


class OptimizedModel:
    """Runs the ``prefill`` graph for multi-token steps and the ``decode`` graph for one-token steps."""

    def __init__(self, spec: ModelSpec, graphs: dict[str, TokenGraph], reports: dict[str, list[PassResult]]):
        self.spec = spec
        self.graphs = graphs
        self.reports = reports

    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache,
    ) -> tuple[torch.Tensor, Cache]:
        """One forward step over ``input_ids`` on top of ``cache``; returns logits and the updated cache."""
        phase = "decode" if input_ids.shape[1] == 1 else "prefill"
        logits, keys, values = self.graphs[phase](input_ids, attention_mask, position_ids, *cache)
        return logits, (keys, values)

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, V]`` for a batch of prompts (left padding marked by ``attention_mask``)."""
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        logits, _ = self.step(input_ids, attention_mask, position_ids, self.spec.empty_cache(input_ids.shape[0]))
        return logits

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding; returns prompt and new tokens ``[B, T + max_new_tokens]`` like HF ``generate``."""
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask)
        limit = self.spec.max_positions
        if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
            raise TokenpassError(
                f"prompt of {input_ids.shape[1]} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                f"{limit} positions"
            )
        return greedy_generate(self.step, self.spec, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)

    @staticmethod
    def _check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise TokenpassError("input_ids must be a 2-D tensor [batch, tokens]")
        if input_ids.shape[1] == 0:
            raise TokenpassError("the prompt is empty: input_ids has 0 tokens")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise TokenpassError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        return input_ids, attention_mask.to(torch.long)
