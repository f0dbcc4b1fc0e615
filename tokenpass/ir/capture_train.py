"""Capture a causal LM's training step: ``model(input_ids, attention_mask, labels)`` -> ``(loss, logits)``.

The third phase beside ``prefill`` and ``decode``. Training passes (Cut Cross-Entropy) rewrite what the
model computes between its last hidden state and its loss, and that only exists in a forward called with
``labels``: HF models shift the labels, cast the logits, flatten both and call ``cross_entropy`` inside
their own forward. So the step is exported as the model's own forward with labels, in train mode
(dropout as training runs it), without a KV cache.

``torch.export`` gives the training IR here (ATen ops before autograd), whose graph module is a plain
function of the parameters: the runtime calls it with the model's own parameter tensors under autograd
(``runtime/training.py``), so ``loss.backward()`` fills the original parameters' ``.grad`` and an
optimizer over them trains the original model.
"""

from __future__ import annotations

import torch
import torch.fx.experimental._config as fx_config
from torch import nn

from tokenpass.errors import CaptureError
from tokenpass.ir.capture import ModelSpec, _first_line, module_mode

TRAIN = "train"
TRAIN_ARGS: tuple[str, ...] = ("input_ids", "attention_mask", "labels")
IGNORE_INDEX = -100  # HF's label for positions without a loss


class CausalLMTrainStep(nn.Module):
    """The model's own training forward with the arguments a training loop passes, loss and logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
        return out.loss, out.logits


def train_sample_inputs(spec: ModelSpec, batch: int = 2, tokens: int = 7) -> tuple[torch.Tensor, ...]:
    """A training batch with left padding on row 0 and its labels ignored there, drawn on the CPU from a
    seeded generator and moved to the model's device (as ``capture.sample_inputs`` does)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (batch, tokens), generator=generator)
    mask = torch.ones((batch, tokens), dtype=torch.long)
    mask[0, :2] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return ids.to(spec.device), mask.to(spec.device), labels.to(spec.device)


def export_train(model: nn.Module, spec: ModelSpec) -> torch.export.ExportedProgram:
    """Export the training step for any batch and length; failures become one-line ``CaptureError``s."""
    dyn = torch.export.Dim.DYNAMIC
    shapes = {name: {0: dyn, 1: dyn} for name in TRAIN_ARGS}
    step = CausalLMTrainStep(model)
    try:
        with module_mode(model, training=True), fx_config.patch(backed_size_oblivious=True):
            program = torch.export.export(step, train_sample_inputs(spec), dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types; the user needs one line
        raise CaptureError(f"cannot capture {spec.name} (train step with labels) with torch.export: "
                           f"{_first_line(exc)}") from None
    check_train_program(program, spec)
    return program


def check_train_program(program: torch.export.ExportedProgram, spec: ModelSpec) -> None:
    """Refuse a training step the runtime cannot drive: one that returns no loss, or that updates buffers
    in place (running statistics): the runtime calls the graph as a pure function of its inputs."""
    kinds = {spec_.kind for spec_ in program.graph_signature.output_specs}
    mutations = kinds - {torch.export.graph_signature.OutputKind.USER_OUTPUT}
    if mutations:
        raise CaptureError(f"cannot capture {spec.name} (train step): it updates state in place "
                           f"({', '.join(sorted(k.name for k in mutations))}), which tokenpass does not replay")
    (output,) = [n for n in program.graph.nodes if n.op == "output"]
    loss = output.args[0][0]
    if loss is None:
        raise CaptureError(f"{spec.name} returned no loss when called with labels: it is not a causal LM "
                           "whose forward computes its own loss")
