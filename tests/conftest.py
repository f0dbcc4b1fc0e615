"""Shared fixtures: the real SmolLM2 model is loaded and captured once per test session."""

from __future__ import annotations

import os

# Triton kernels run under the interpreter on machines without a GPU; must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("TOKENPASS_GPU_TESTS") else "1")

import pytest
import torch

import tokenpass
from tokenpass.models import TINY_FAMILIES
from tokenpass.runtime.generate import positions_from_mask

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2():
    return tokenpass.load("smollm2")


@pytest.fixture(scope="session")
def smollm2_optimized(smollm2):
    return tokenpass.optimize(smollm2, passes=["canonicalize_attention", "dce"], verify=True, name="smollm2")


@pytest.fixture(params=TINY_FAMILIES)
def family(request) -> str:
    return request.param


def padded_batch(vocab: int, batch: int = 2, length: int = 12, pad: int = 4, seed: int = 1):
    """Random prompts; row 0 is left-padded by ``pad`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 20000), (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


def reference_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits


def hf_greedy(model, ids, mask, new_tokens):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
