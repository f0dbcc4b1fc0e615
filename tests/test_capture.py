import pytest
import torch
from torch import nn

import tokenpass
from tokenpass.errors import CaptureError
from tokenpass.ir.capture import CausalLMStep, cache_argument, sample_inputs


@pytest.mark.parametrize("phase,shapes", [
    ("prefill", [(1, 2, 0), (3, 4, 0), (2, 3, 7)]),
    ("decode", [(1, 1, 0), (2, 1, 9), (3, 1, 1)]),
])
def test_captured_step_matches_eager_for_any_batch_and_past(family, phase, shapes):
    model = tokenpass.tiny(family)
    graph = tokenpass.capture(model, phases=(phase,))[phase]
    step = CausalLMStep(model)
    for batch, new, past in shapes:
        inputs = sample_inputs(graph.spec, phase, batch=batch, past=past, new=new)
        got = torch.utils._pytree.tree_leaves(graph(*inputs))
        with torch.no_grad():
            want = torch.utils._pytree.tree_leaves(step(*inputs))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_kv_cache_is_explicit_in_the_graph():
    graph = tokenpass.capture(tokenpass.tiny("llama"), phases=("decode",))["decode"]
    sig = graph.signature()
    inputs = [v["name"] for v in sig["inputs"]]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [n for n in inputs if n.startswith("past_keys_")] == [f"past_keys_{i}" for i in range(4)]
    assert len(sig["outputs"]) == 1 + 2 * 4  # logits + present keys/values per layer
    assert sig["inputs"][0]["shape"][1] == "1"  # the decode step takes one token


class _DataDependent(nn.Module):
    """A causal LM whose forward branches on token values: torch.export cannot trace that."""

    def __init__(self):
        super().__init__()
        self.inner = tokenpass.tiny("llama")
        self.config = self.inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
        if input_ids.float().mean() > 1e9:
            input_ids = input_ids * 0
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, use_cache=use_cache)


def test_untraceable_model_gives_one_line_error():
    with pytest.raises(CaptureError) as info:
        tokenpass.capture(_DataDependent(), phases=("decode",))
    message = str(info.value)
    assert "\n" not in message and "cannot capture" in message and "decode" in message


def test_non_causal_lm_module_is_refused_in_one_line():
    with pytest.raises(CaptureError, match="Linear is not a causal LM: its forward lacks input_ids") as info:
        tokenpass.capture(nn.Linear(4, 4))
    assert "\n" not in str(info.value)


class _NoCacheArgument(nn.Module):
    def forward(self, input_ids, attention_mask=None):
        return input_ids.float()


def test_forward_without_a_cache_keyword_is_refused_naming_both_names():
    with pytest.raises(CaptureError, match="forward takes no KV cache \\(neither cache nor past_key_values") as info:
        tokenpass.capture(_NoCacheArgument())
    assert "\n" not in str(info.value)


class _CacheKeyword(nn.Module):
    """A causal LM taking its cache as ``cache`` (transformers 5.24's name) whatever the installed version."""

    def __init__(self):
        super().__init__()
        self.inner = tokenpass.tiny("llama")
        self.config = self.inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, **{cache_argument(self.inner): cache})


def test_a_forward_taking_cache_by_the_new_name_is_captured_exactly():
    model = _CacheKeyword().eval()
    ids = torch.tensor([[5, 9, 2, 7, 3]])
    optimized = tokenpass.optimize(model, passes=[], lower=True)
    with torch.no_grad():
        expected = model.inner.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(optimized.generate(ids, max_new_tokens=6), expected)


class _NoCache(nn.Module):
    def forward(self, input_ids, past_key_values=None, **kwargs):
        return input_ids.float()


def test_module_without_logits_or_cache_is_refused():
    with pytest.raises(CaptureError, match="not a causal LM tokenpass can drive"):
        tokenpass.capture(_NoCache())
