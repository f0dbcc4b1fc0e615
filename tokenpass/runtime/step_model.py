"""``StepModel``: what every runnable form of a model shares: prompt checks and the generation loop.

The torch runtime (``OptimizedModel``) and the ONNX runtime (``runtime/onnx_session.py``) differ only in
the session that runs a step; the arguments users pass, their one-line errors and the loop that feeds
tokens back are one code path, so both runtimes answer the same prompt with the same tokens.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch

from tokenpass.errors import TokenpassError
from tokenpass.ir.capture import ModelSpec
from tokenpass.runtime.generate import Sampling, generate_tokens, positions_from_mask


class StepModel:
    """A model run step by step over sessions: subclasses say how a session is made."""

    spec: ModelSpec

    def session(self, batch: int, capacity: int = 64, budget: int | None = None):
        """A fresh cache for ``batch`` sequences and the step loop over it."""
        raise NotImplementedError

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, V]`` for a batch of prompts (left padding marked by ``attention_mask``), on the
        model's device; inputs on another device (CPU ids for a CUDA model) are moved there first."""
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        position_ids = position_ids.to(self.spec.device)
        session = self.session(input_ids.shape[0], capacity=input_ids.shape[1])
        return session.step(input_ids, attention_mask, position_ids)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
        streamer: Callable[[torch.Tensor], None] | None = None,
        kv_budget: int | None = None,
    ) -> torch.Tensor:
        """Prompt and new tokens ``[B, T + n]``, with the semantics of HF ``generate`` for these arguments.

        ``streamer`` is called with each step's new tokens ``[B]`` as soon as they exist; ``seed`` makes
        sampling reproducible. ``kv_budget`` keeps at most that many cache slots per sequence and head
        (a recent window unless an eviction pass chooses), so memory stays bounded.

        The prompt may live on any device (CPU ids for a CUDA model are moved to the model's device, as the
        cache and every buffer of the loop are made there); the returned tokens are on the model's device.
        """
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask)
        max_new_tokens = _count("max_new_tokens", max_new_tokens)
        limit = self.spec.max_positions
        if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
            raise TokenpassError(
                f"prompt of {input_ids.shape[1]} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                f"{limit} positions"
            )
        sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
        session = self.session(input_ids.shape[0], input_ids.shape[1] + max_new_tokens, kv_budget)
        return generate_tokens(
            session, input_ids, attention_mask, max_new_tokens, sampling, eos_token_id, pad_token_id, streamer
        )

    def _check_prompt(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt as the graphs take it (``long`` ids and mask), or a one-line error naming the
        argument: what reaches the graphs unchecked fails many frames deep in torch, or silently."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise TokenpassError("input_ids must be a 2-D tensor [batch, tokens]")
        if input_ids.shape[1] == 0:
            raise TokenpassError("the prompt is empty: input_ids has 0 tokens")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TokenpassError(f"input_ids must hold integer token ids, got dtype {_dtype(input_ids)}")
        limit = self.spec.max_positions
        if limit is not None and input_ids.shape[1] > limit:
            raise TokenpassError(f"prompt of {input_ids.shape[1]} tokens exceeds the model's {limit} positions")
        input_ids = input_ids.to(self.spec.device)  # checked where it runs: no stray copies on the caller's device
        _check_ids(input_ids, self.spec.vocab_size)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not isinstance(attention_mask, torch.Tensor):
            raise TokenpassError(f"attention_mask must be a tensor like input_ids, got {type(attention_mask).__name__}")
        if attention_mask.shape != input_ids.shape:
            raise TokenpassError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        attention_mask = attention_mask.to(self.spec.device)
        _check_mask(attention_mask)
        return input_ids.to(torch.long), attention_mask.to(torch.long)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _count(name: str, value: object) -> int:
    """A non-negative integer argument (numpy and torch integers accepted; 2.5 and True are not)."""
    try:
        count = operator.index(value)
    except TypeError:
        count = None
    if count is None or isinstance(value, bool) or count < 0:
        raise TokenpassError(f"{name} must be a non-negative integer, got {value!r}")
    return count


def _check_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids index the embedding: outside ``[0, vocab_size)`` torch fails deep in ``embedding``."""
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise TokenpassError(f"input_ids must be token ids in [0, {vocab_size}) (the model's vocabulary), "
                             f"got {int(input_ids[row, col])} at row {row}, position {col}")


def _check_mask(attention_mask: torch.Tensor) -> None:
    """Only 0 (padding) and 1 (token), and at least one token per row. What HF returns for an all-padding
    row is an artefact of attending over no key, not a defined result, so the row is refused rather than
    answered differently. One boolean read per check: on a GPU each is a synchronisation."""
    bad = (attention_mask != 0) & (attention_mask != 1)
    if bad.any():
        values = sorted({str(v) for v in attention_mask[bad].tolist()})
        raise TokenpassError(f"attention_mask must hold only 0 (padding) and 1 (token), found {', '.join(values[:3])}")
    empty = (attention_mask == 0).all(dim=1)
    if empty.any():
        raise TokenpassError(f"attention_mask row {int(empty.nonzero()[0])} is all zeros: every row needs at least "
                             "one token")
