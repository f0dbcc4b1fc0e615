"""``OptimizedModel``: the captured, rewritten graphs of a model behind a familiar forward/generate API."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from tokenpass.errors import TokenpassError
from tokenpass.ir.capture import ModelSpec
from tokenpass.ir.graph import TokenGraph
from tokenpass.passes.base import PassResult
from tokenpass.runtime.executor import new_cache, run_step
from tokenpass.runtime.generate import Sampling, generate_tokens, positions_from_mask
from tokenpass.runtime.kv_cache import KVCache


GUARD_FAILED = "Guard failed: "  # how ExportedProgram.module() reports inputs its trace does not cover
_GUARD_INPUT = re.compile(r"(\w+)(?:\[\d+\])*\.size\(\)\[(\d+)\]")


def guard_error(graph: TokenGraph, exc: AssertionError, input_ids: torch.Tensor) -> TokenpassError:
    """One line for an input the captured program was not traced to accept (instead of torch's bare
    ``AssertionError: Guard failed: ...``), naming the step, the input and dim, and the condition."""
    condition = str(exc)[len(GUARD_FAILED) :].strip().splitlines()[0]
    found = _GUARD_INPUT.search(condition)
    where = f"{found.group(1)} dim {found.group(2)}" if found else "its inputs"
    return TokenpassError(
        f"the {graph.label} step cannot run on input_ids of shape {tuple(input_ids.shape)}: "
        f"{where} violates the captured program's guard {condition}"
    )


class GraphCache:
    """The cache of graphs that were not lowered: the captured step's own past/present tensors."""

    def __init__(self, spec: ModelSpec, batch: int):
        self.keys, self.values = spec.empty_cache(batch)
        self.mask = torch.zeros((batch, 0), dtype=torch.long)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class OptimizedModel:
    """Runs the ``prefill`` graph for multi-token steps and the ``decode`` graph for one-token steps.

    Lowered graphs (``lower_kv_cache``) attend over the runtime-owned ``KVCache``; graphs that were not
    lowered carry their cache as explicit tensors (``GraphCache``). ``step`` hides the difference.
    """

    def __init__(self, spec: ModelSpec, graphs: dict[str, TokenGraph], reports: dict[str, list[PassResult]]):
        self.spec = spec
        self.graphs = graphs
        self.reports = reports
        self.lowered = all("runtime_kv_cache" in g.properties for g in graphs.values())

    def new_cache(self, batch: int, capacity: int = 64, budget: int | None = None) -> KVCache | GraphCache:
        """An empty cache for ``batch`` sequences; ``capacity`` reserves slots for the expected length;
        ``budget`` caps the slots kept per sequence and head (older tokens are evicted)."""
        if not self.lowered:
            if budget is not None:
                raise TokenpassError("a KV budget needs the runtime cache: optimize(..., lower=True)")
            return GraphCache(self.spec, batch)
        return new_cache(self.graphs["decode"], batch, capacity, budget)

    def step(
        self,
        cache: KVCache | GraphCache,
        input_ids: torch.Tensor,
        token_valid: torch.Tensor,
        position_ids: torch.Tensor,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Run ``input_ids`` ``[B, T]`` on top of ``cache`` (extended in place); returns logits ``[B, T, V]``.

        ``token_valid`` marks real tokens (False for left padding); ``position_ids`` are their positions.
        ``last_only`` lets lowered graphs compute the last position's logits only (``[B, 1, V]``).
        """
        graph = self.graphs["decode" if input_ids.shape[1] == 1 else "prefill"]
        try:
            if isinstance(cache, KVCache):
                return run_step(graph, cache, input_ids, token_valid, position_ids, last_only)
            mask = torch.cat([cache.mask, token_valid.long()], dim=1)
            with torch.no_grad():
                logits, cache.keys, cache.values = graph(input_ids, mask, position_ids, cache.keys, cache.values)
            cache.mask = mask
            return logits
        except AssertionError as exc:
            if not str(exc).startswith(GUARD_FAILED):
                raise
            raise guard_error(graph, exc, input_ids) from None

    @property
    def correction_interval(self) -> int | None:
        """Decode steps between dense re-encodings of the sparsely decoded tokens (None: never)."""
        return self.graphs["decode"].runtime_options.get("correction_interval")

    def reencode(self, cache: KVCache, input_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Overwrite the cache entries of the last ``T`` tokens with those of a dense (prefill-graph) pass.

        Sparse decode layers compute each new token's keys/values from an approximate context; running the
        same tokens again through the dense prefill step bounds that drift (TidalDecode's cache correction).
        """
        cache.rewind(input_ids.shape[1])
        run_step(self.graphs["prefill"], cache, input_ids, torch.ones_like(input_ids), position_ids, last_only=True)

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
        cache = self.new_cache(input_ids.shape[0], capacity=input_ids.shape[1])
        return self.step(cache, input_ids, attention_mask, position_ids)

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
        """
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask)
        if max_new_tokens < 0:
            raise TokenpassError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        limit = self.spec.max_positions
        if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
            raise TokenpassError(
                f"prompt of {input_ids.shape[1]} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                f"{limit} positions"
            )
        sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens, kv_budget)
        return generate_tokens(
            self, cache, input_ids, attention_mask, max_new_tokens, sampling, eos_token_id, pad_token_id, streamer
        )

    def _check_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise TokenpassError("input_ids must be a 2-D tensor [batch, tokens]")
        if input_ids.shape[1] == 0:
            raise TokenpassError("the prompt is empty: input_ids has 0 tokens")
        limit = self.spec.max_positions
        if limit is not None and input_ids.shape[1] > limit:
            raise TokenpassError(f"prompt of {input_ids.shape[1]} tokens exceeds the model's {limit} positions")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise TokenpassError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        return input_ids, attention_mask.to(torch.long)
