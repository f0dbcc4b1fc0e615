"""``OptimizedModel``: the captured, rewritten graphs of a model behind a familiar forward/generate API."""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch

from tokenpass.errors import TokenpassError
from tokenpass.ir.capture import ModelSpec
from tokenpass.ir.capture_train import TRAIN
from tokenpass.ir.graph import TokenGraph
from tokenpass.runtime.compiled import CompiledSteps, CompileReport
from tokenpass.runtime.executor import new_cache
from tokenpass.runtime.generate import Sampling, generate_tokens, positions_from_mask
from tokenpass.runtime.policy import build_policies
from tokenpass.runtime.session import ExplicitSession, Session
from tokenpass.runtime.training import TrainOutput, TrainStep, check_labels


class OptimizedModel:
    """Runs the ``prefill`` graph for multi-token steps and the ``decode`` graph for one-token steps.

    Lowered graphs (``lower_kv_cache``) attend over the runtime-owned ``KVCache`` with the per-slot
    states and run-time policies their passes declared; graphs that were not lowered carry their cache
    as explicit tensors. ``session`` hides the difference.
    """

    def __init__(self, spec: ModelSpec, graphs: dict[str, TokenGraph], reports: dict[str, list] | None = None):
        self.spec = spec
        self.graphs = graphs
        self.reports = reports or {}
        # The training step (``train``) runs apart from the step loop: no cache, autograd on.
        self.step_graphs = {phase: graph for phase, graph in graphs.items() if phase != TRAIN}
        self.train_step = TrainStep(graphs[TRAIN]) if TRAIN in graphs else None
        lowered = {phase: graph.reads_runtime_cache() for phase, graph in self.step_graphs.items()}
        if len(set(lowered.values())) > 1:
            raise TokenpassError(
                f"{spec.name}: the {', '.join(p for p, low in lowered.items() if low)} graph reads the runtime KV "
                f"cache but the {', '.join(p for p, low in lowered.items() if not low)} graph does not; both "
                "phases must be lowered alike (see the lower_kv_cache reports)"
            )
        self.lowered = all(lowered.values())
        self.compiled_steps: CompiledSteps | None = None

    def compiled(self, cpp_wrapper: bool = False) -> "OptimizedModel":
        """This model with its steps compiled by ``torch.compile`` (``runtime/compiled.py``): same graphs,
        same tokens; each shape bucket compiles on its first call, recorded in ``compile_report``.
        ``cpp_wrapper``: kernels called from C++ (a faster step, a much slower first compilation)."""
        twin = OptimizedModel(self.spec, self.graphs, self.reports)
        twin.compiled_steps = CompiledSteps(self.step_graphs, cpp_wrapper)
        return twin

    @property
    def compile_report(self) -> CompileReport | None:
        """What compiling cost so far (``None``: not compiled)."""
        return None if self.compiled_steps is None else self.compiled_steps.report

    def session(self, batch: int, capacity: int = 64, budget: int | None = None) -> Session | ExplicitSession:
        """A fresh cache for ``batch`` sequences and the step loop over it; ``capacity`` reserves slots for
        the expected length; ``budget`` caps the slots kept per sequence and head (older ones are evicted)."""
        graphs = self.step_graphs
        if not graphs:
            raise TokenpassError(f"{self.spec.name} was optimized for training only (phases={list(self.graphs)}): "
                                 "optimize it with the prefill and decode phases to run inference")
        if not self.lowered:
            if budget is not None:
                raise TokenpassError("a KV budget needs the runtime cache, and this model's graphs were not lowered")
            return ExplicitSession(graphs, self.spec, batch)
        cache = new_cache(graphs, batch, capacity, budget)
        policies = build_policies([p for graph in graphs.values() for p in graph.policies])
        return Session(graphs, cache, policies, self.compiled_steps)

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> "torch.Tensor | TrainOutput":
        """Logits ``[B, T, V]`` for a batch of prompts (left padding marked by ``attention_mask``), on the
        model's device; inputs on another device (CPU ids for a CUDA model) are moved there first.

        With ``labels`` (HF's convention: the ids themselves, -100 where no loss is wanted, shifted
        inside), the training step runs under autograd and returns ``TrainOutput(loss, logits)``
        (logits None once ``cutcrossentropy`` dropped them); ``loss.backward()`` fills the original
        parameters' gradients."""
        if labels is not None:
            return self.train(input_ids, attention_mask, labels, position_ids)
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        position_ids = position_ids.to(self.spec.device)
        session = self.session(input_ids.shape[0], capacity=input_ids.shape[1])
        return session.step(input_ids, attention_mask, position_ids)

    def train(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
              position_ids: torch.Tensor | None = None) -> TrainOutput:
        """The training forward (see ``__call__``), after one-line checks of every argument."""
        if self.train_step is None:
            raise TokenpassError(f"{self.spec.name} has no training step: optimize it with a training pass "
                                 "(cutcrossentropy) or phases=[..., 'train'] to call it with labels")
        if position_ids is not None:
            raise TokenpassError("the training step computes positions itself (as the model does); drop position_ids")
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask)
        labels = check_labels(labels, input_ids, self.spec.vocab_size)
        return self.train_step(input_ids, attention_mask, labels)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the training step updates (the original model's own tensors, each once): what
        an optimizer takes, ``torch.optim.AdamW(optimized.parameters())``."""
        if self.train_step is None:
            raise TokenpassError(f"{self.spec.name} has no training step, hence nothing to train")
        return self.train_step.parameters()

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
        raise TokenpassError(f"attention_mask row {int(empty.nonzero()[0])} is all zeros: every row needs at least one token")
