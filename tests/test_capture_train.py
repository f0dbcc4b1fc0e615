"""The training step as a captured phase: the model's own forward with labels, run under autograd on the
model's own parameters (no pass involved: what any training pass builds on)."""

from __future__ import annotations

import copy

import pytest
import torch

import tokenpass
from tokenpass.ir.capture_train import TRAIN


@pytest.mark.parametrize("batch", [1, 3])
def test_captured_train_step_is_the_models_training_forward(batch):
    model = tokenpass.tiny("llama")
    twin = copy.deepcopy(model).train()
    optimized = tokenpass.optimize(model, phases=[TRAIN])
    assert model.training is False, "capturing must not change the caller's module"
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 320, (batch, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    out = optimized(ids, mask, labels=labels)
    expected = twin(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, expected.logits)
    out.loss.backward()
    expected.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss)
    for (name, mine), theirs in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, msg=name)
    assert {id(p) for p in optimized.parameters()} == {id(p) for p in model.parameters()}


def test_unknown_phase_is_named():
    with pytest.raises(tokenpass.TokenpassError, match="unknown phase 'training'"):
        tokenpass.optimize(tokenpass.tiny("llama"), phases=["training"])
