"""``OptimizedModel``: the captured, rewritten graphs of a model behind a familiar forward/generate API."""

from __future__ import annotations

import torch

from tokenpass.errors import TokenpassError
from tokenpass.ir.capture import ModelSpec
from tokenpass.ir.capture_train import TRAIN
from tokenpass.ir.graph import TokenGraph
from tokenpass.runtime.compiled import CompiledSteps, CompileReport
from tokenpass.runtime.executor import new_cache
from tokenpass.runtime.policy import build_policies
from tokenpass.runtime.session import ExplicitSession, Session
from tokenpass.runtime.step_model import StepModel
from tokenpass.runtime.training import TrainOutput, TrainStep, check_labels


class OptimizedModel(StepModel):
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
            return ExplicitSession(graphs, self.spec, batch, self._policies())
        cache = new_cache(graphs, batch, capacity, budget)
        return Session(graphs, cache, self._policies(), self.compiled_steps)

    def _policies(self) -> list:
        return build_policies([p for graph in self.step_graphs.values() for p in graph.policies])

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
        return self.logits(input_ids, attention_mask, position_ids)

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
