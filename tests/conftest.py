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

# The suite runs on 2 pytest-xdist workers (README's test command): one thread each, so the workers
# never fight over the cores (two 2-thread workers on 2 cores thrash). Alone, a run uses every core.
torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


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


def teacher_forced(optimized, ids, mask, prompt: int):
    """Prefill ``prompt`` columns, then decode the rest one token per step; logits of every column after."""
    session = optimized.session(ids.shape[0], capacity=ids.shape[1])
    positions = positions_from_mask(mask)
    rows = [session.step(ids[:, :prompt], mask[:, :prompt], positions[:, :prompt])[:, -1:]]
    for t in range(prompt, ids.shape[1] - 1):
        rows.append(session.step(ids[:, t : t + 1], mask[:, t : t + 1], positions[:, t : t + 1]))
    return torch.cat(rows, 1), session


def genai_generate(directory, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy tokens from onnxruntime-genai's own generator over an export (its ``genai_config.json``)."""
    import onnxruntime_genai as og

    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids.int().numpy())
    while not generator.is_done():
        generator.generate_next_token()
    return torch.stack([torch.from_numpy(generator.get_sequence(i)).long() for i in range(ids.shape[0])])


def reference_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits


def hf_greedy(model, ids, mask, new_tokens):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )


SMALL_DECODER = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def hf_tiny(model_type: str, attn: str = "sdpa", seed: int = 0, **overrides):
    """A small random decoder straight from transformers' config class for ``model_type`` (families
    ``tokenpass.tiny`` does not cover, with windows, soft-caps or eager attention)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**SMALL_DECODER, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def hf_recompute_greedy(model, ids, mask, new_tokens):
    """Greedy tokens from HF's *uncached* forward, recomputing the whole sequence every step: the model's
    semantics with no cache implementation in between (HF's cached generate disagrees with it for some
    sliding-window configurations, e.g. Qwen2 with mixed full/sliding layers)."""
    tokens = ids
    for _ in range(new_tokens):
        full = torch.cat([mask, mask.new_ones(mask.shape[0], tokens.shape[1] - mask.shape[1])], 1)
        with torch.no_grad():
            logits = model(input_ids=tokens, attention_mask=full, position_ids=positions_from_mask(full)).logits
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return tokens


def hf_reference_logprobs(model, ids, context: int, steps: int, name: str, attention) -> torch.Tensor:
    """Next-token log-probabilities ``[steps, V]`` of the HF model with ``attention`` registered as its
    attention function: prefill ``ids[:, :context]``, then one decode step per token through HF's own
    cache (how the methods' masked references run)."""
    from transformers import AttentionInterface, DynamicCache

    from tokenpass.ir.capture import cache_argument

    AttentionInterface.register(name, attention)
    model.set_attn_implementation(name)
    try:
        cache, rows = {cache_argument(model): DynamicCache()}, []
        with torch.no_grad():
            out = model(input_ids=ids[:, :context], use_cache=True, **cache)
            rows.append(out.logits[0, -1].log_softmax(-1))
            for i in range(steps - 1):
                out = model(input_ids=ids[:, context + i : context + i + 1], use_cache=True, **cache)
                rows.append(out.logits[0, -1].log_softmax(-1))
    finally:
        model.set_attn_implementation("sdpa")
    return torch.stack(rows)


def assert_ragged_rows_equal_alone(optimized, lengths=(30, 21, 26), new_tokens: int = 20, seed: int = 2) -> None:
    """A left-padded batch of ragged prompts gives each row the tokens that row gets alone."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 300, (n,), generator=generator) for n in lengths]
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, -len(row):], mask[r, -len(row):] = row, 1
    batch = optimized.generate(ids, mask, max_new_tokens=new_tokens)[:, -new_tokens:]
    for r, row in enumerate(rows):
        alone = optimized.generate(row[None], max_new_tokens=new_tokens)[0, -new_tokens:]
        assert torch.equal(batch[r], alone), f"row {r} differs from the row run alone"
