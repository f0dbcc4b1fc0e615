"""Captured programs run on any batch size, 1-row batches included, or capture refuses in one line.

Falcon's multi-query attention reshapes a strided slice of its fused QKV projection; ATen's reshape
decides view-or-copy by a contiguity test that skips size-1 dims, so tracing a 2-row batch records the
guard ``batch != 1``. Capture must admit 1-row batches anyway (the recorded reshape decides again at run
time), and a guard that does matter must be a one-line error at capture or run time, never a bare
``AssertionError`` from ``generate``.
"""

import pytest
import torch
from torch import nn

import tokenpass
from tokenpass.errors import CaptureError, TokenpassError
from tokenpass.ir.capture import CausalLMStep, one_row_violations, sample_inputs

from conftest import hf_greedy, padded_batch


def _tiny_falcon() -> nn.Module:
    """Falcon's default config is multi-query attention. ``initializer_range=0.1`` makes greedy generation
    vary instead of repeating one token. No EOS for HF's generate: ``hf_greedy``'s ``min_new_tokens`` would
    suppress it, while tokenpass (asked for no EOS) may pick it."""
    from transformers import AutoModelForCausalLM, FalconConfig

    torch.manual_seed(0)
    config = FalconConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          initializer_range=0.1)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def falcon():
    model = _tiny_falcon()
    return model, tokenpass.optimize(model)


def _check_batches_of_one_and_two(model: nn.Module, optimized, new_tokens: int = 16) -> None:
    vocab = model.config.vocab_size
    single = torch.randint(3, min(vocab, 300), (1, 20), generator=torch.Generator().manual_seed(1))
    ones = torch.ones_like(single)
    got = optimized.generate(single, max_new_tokens=new_tokens)
    assert torch.equal(got, hf_greedy(model, single, ones, new_tokens))
    ids, mask = padded_batch(vocab)
    got = optimized.generate(ids, mask, max_new_tokens=new_tokens)
    assert torch.equal(got, hf_greedy(model, ids, mask, new_tokens))


def test_falcon_greedy_matches_hf_at_batch_one_and_two(falcon):
    model, optimized = falcon
    for graph in optimized.graphs.values():
        assert one_row_violations(graph.program, graph.spec, graph.phase) == []
    _check_batches_of_one_and_two(model, optimized)


def test_falcon_captured_steps_match_eager_at_batch_one():
    model = _tiny_falcon()
    graphs = tokenpass.capture(model)
    step = CausalLMStep(model)
    for phase, new in (("prefill", 4), ("decode", 1)):
        for past in (0, 3):
            inputs = sample_inputs(graphs[phase].spec, phase, batch=1, past=past, new=new)
            with torch.no_grad():
                want = torch.utils._pytree.tree_leaves(step(*inputs))
            for got, ref in zip(torch.utils._pytree.tree_leaves(graphs[phase](*inputs)), want):
                torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_tiny_families_generate_at_batch_one_and_two(family):
    model = tokenpass.tiny(family)
    _check_batches_of_one_and_two(model, tokenpass.optimize(model))


class _OneRowBranch(nn.Module):
    """A causal LM that computes differently for a 1-row batch: no trace covers both batch sizes."""

    def __init__(self):
        super().__init__()
        self.inner = tokenpass.tiny("llama")
        self.config = self.inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=use_cache)
        if input_ids.shape[0] == 1:
            out.logits = out.logits * 2
        return out


def test_model_branching_on_a_one_row_batch_is_refused_in_one_line():
    with pytest.raises(CaptureError) as info:
        tokenpass.capture(_OneRowBranch(), phases=("decode",))
    message = str(info.value)
    assert "\n" not in message
    assert "llama (decode step) for 1-row batches (input dim 0)" in message and "size()[0] != 1" in message
    assert "computes differently at batch 1" in message


def test_a_guard_failing_at_run_time_is_a_one_line_error():
    optimized = tokenpass.optimize(tokenpass.tiny("llama"))
    graph = optimized.graphs["prefill"]
    graph.program._guards_code.append("L['input_ids'].size()[0] != 1")  # stands in for a guard capture kept
    graph.mark_changed()
    with pytest.raises(TokenpassError) as info:
        optimized.generate(torch.randint(3, 300, (1, 6)), max_new_tokens=2)
    message = str(info.value)
    assert "\n" not in message
    assert "llama/prefill step" in message and "input_ids dim 0" in message and "!= 1" in message
