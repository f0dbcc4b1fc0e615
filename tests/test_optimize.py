import pytest
import torch

import tokenpass
from tokenpass.errors import TokenpassError

from conftest import hf_greedy, padded_batch, reference_logits

# (passes, lower): the captured graph as it is, canonicalised, and lowered onto the runtime KV cache.
CONFIGS = [([], False), (["canonicalize_attention", "dce"], False), ([], True)]


def _check_exact(model, optimized, vocab, new_tokens=64):
    ids, mask = padded_batch(vocab)
    got = optimized(ids, mask)
    want = reference_logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-4)
    assert torch.equal(optimized.generate(ids, mask, max_new_tokens=new_tokens), hf_greedy(model, ids, mask, new_tokens))


@pytest.mark.parametrize("passes,lower", CONFIGS, ids=["captured", "canonical", "runtime-cache"])
def test_optimized_tiny_model_reproduces_the_original(family, passes, lower):
    model = tokenpass.tiny(family)
    optimized = tokenpass.optimize(model, passes=passes, verify=True, lower=lower)
    assert optimized.lowered == lower
    _check_exact(model, optimized, model.config.vocab_size)


@pytest.mark.smollm2
def test_optimized_smollm2_reproduces_the_original(smollm2, smollm2_optimized):
    _check_exact(smollm2, smollm2_optimized, smollm2.config.vocab_size)


def test_single_token_prompt_and_batch_of_one():
    model = tokenpass.tiny("llama")
    optimized = tokenpass.optimize(model)
    ids = torch.tensor([[5]])
    mask = torch.ones_like(ids)
    assert torch.equal(optimized.generate(ids, max_new_tokens=8), hf_greedy(model, ids, mask, 8))


def test_eos_stops_and_pads_like_hf():
    model = tokenpass.tiny("gpt2")
    optimized = tokenpass.optimize(model)
    ids, mask = padded_batch(model.config.vocab_size)
    free = optimized.generate(ids, mask, max_new_tokens=10)
    eos = int(free[1, ids.shape[1] + 2])  # make row 1's third new token the EOS
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(optimized.generate(ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0), want)


@pytest.mark.parametrize("ids,message", [
    (torch.zeros((1, 0), dtype=torch.long), "prompt is empty"),
    (torch.zeros((1, 600), dtype=torch.long), "exceeds the model's 512 positions"),
    (torch.zeros(4, dtype=torch.long), "2-D tensor"),
])
def test_bad_prompts_are_clear_errors(ids, message):
    optimized = tokenpass.optimize(tokenpass.tiny("llama"))
    with pytest.raises(TokenpassError, match=message):
        optimized.generate(ids, max_new_tokens=4)


def test_reports_are_kept_per_phase():
    optimized = tokenpass.optimize(tokenpass.tiny("mistral"), passes=["canonicalize_attention"])
    assert set(optimized.reports) == {"prefill", "decode"}
    assert all(r[0].counts["sdpa_to_tokenpass_attention"] == 4 for r in optimized.reports.values())


@pytest.mark.smollm2
def test_smollm2_generate_matches_hf_on_long_and_ragged_prompts(smollm2, smollm2_optimized):
    from tokenpass.models import load_tokenizer
    from tokenpass.texts import read_text, token_ids

    text = torch.tensor(token_ids(load_tokenizer("smollm2"), read_text(), 2048))
    single = text[None, :2048]
    ones = torch.ones_like(single)
    assert torch.equal(smollm2_optimized.generate(single, ones, max_new_tokens=16), hf_greedy(smollm2, single, ones, 16))
    lengths = (16, 300, 1024)  # batch of 3, left-padded to the longest
    ids = torch.full((3, max(lengths)), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = text[row * 512 : row * 512 + n]
        mask[row, -n:] = 1
    assert torch.equal(smollm2_optimized.generate(ids, mask, max_new_tokens=16), hf_greedy(smollm2, ids, mask, 16))
