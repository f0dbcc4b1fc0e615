"""Run a captured training step under autograd, on the model's own parameters.

The exported program's graph module is a function of every parameter, buffer and constant followed by
the user inputs (the "lifted" form). Calling it ourselves, with the very tensors the program's
``state_dict`` holds (the user's ``nn.Parameter`` objects, which ``torch.export`` does not copy), means:

* ``loss.backward()`` accumulates into the original parameters' ``.grad``: an optimizer built on the
  user's model, or on ``OptimizedModel.parameters()``, trains the original model;
* a weight used twice (an LM head tied to the input embedding) is one tensor passed to both uses, and
  autograd sums both gradients into it;
* outputs a pass removed (the logits, once Cut Cross-Entropy has fused the head into the loss) are None,
  whatever the program's original signature said.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export.graph_signature import InputKind

from tokenpass.errors import TokenpassError
from tokenpass.ir.capture_train import IGNORE_INDEX
from tokenpass.ir.graph import TokenGraph


@dataclass
class TrainOutput:
    """What a training forward returns (HF's ``CausalLMOutput`` fields a training loop reads)."""

    loss: torch.Tensor
    logits: torch.Tensor | None


class TrainStep:
    """The ``train`` graph of a model as a callable ``(input_ids, attention_mask, labels) -> TrainOutput``."""

    def __init__(self, graph: TokenGraph):
        self.graph = graph

    def lifted_arguments(self, user_inputs: tuple[torch.Tensor, ...]) -> list:
        """Every placeholder's value in order: the program's own state tensors, then the user inputs."""
        program = self.graph.program
        user = iter(user_inputs)
        values = []
        for spec in program.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                values.append(next(user))
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in program.state_dict:
                values.append(program.state_dict[spec.target])
            elif spec.target in program.constants:
                values.append(program.constants[spec.target])
            else:
                raise TokenpassError(f"{self.graph.label}: input {spec.arg.name} ({spec.kind.name}) has no value "
                                     "in the captured program")
        return values

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> TrainOutput:
        outputs = self.graph.program.graph_module(*self.lifted_arguments((input_ids, attention_mask, labels)))
        loss, logits = outputs[0], outputs[1] if len(outputs) > 1 else None
        return TrainOutput(loss=loss, logits=logits)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trained tensors, each once (tied weights appear under two names but are one tensor)."""
        program = self.graph.program
        seen: dict[int, torch.Tensor] = {}
        for name in program.graph_signature.parameters:
            tensor = program.state_dict[name]
            seen.setdefault(id(tensor), tensor)
        return list(seen.values())


def check_labels(labels: torch.Tensor, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``labels`` as the training step takes them (``long``, on ``input_ids``' device), or a one-line error:
    an id outside the vocabulary would otherwise fail deep in the loss (or, on a GPU, assert in a kernel)."""
    if not isinstance(labels, torch.Tensor):
        raise TokenpassError(f"labels must be a tensor like input_ids, got {type(labels).__name__}")
    if labels.shape != input_ids.shape:
        raise TokenpassError(f"labels shape {tuple(labels.shape)} differs from input_ids {tuple(input_ids.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TokenpassError(f"labels must hold integer token ids (or {IGNORE_INDEX}), got dtype "
                             f"{str(labels.dtype).replace('torch.', '')}")
    labels = labels.to(input_ids.device, torch.long)
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != IGNORE_INDEX)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise TokenpassError(f"labels must be token ids in [0, {vocab_size}) or {IGNORE_INDEX} (no loss), got "
                             f"{int(labels[row, col])} at row {row}, position {col}")
    return labels
