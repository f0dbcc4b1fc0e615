"""KV eviction (Keyformer, H2O, StreamingLLM): exactness, a masked reference, batches, memory, errors."""

import itertools

import pytest
import torch

import tokenpass
from tokenpass.bench import teacher_forced
from tokenpass.errors import PassError
from tokenpass.kernels.scored_attention_ref import gumbel_noise, scored_attention_reference, temperature
from tokenpass.methods.kvevict import EVICTED
from tokenpass.methods.keyformer import Keyformer
from tokenpass.methods.streamingllm import StreamingLLM
from tokenpass.runtime.generate import positions_from_mask

from conftest import assert_ragged_rows_equal_alone, hf_greedy, hf_reference_logprobs, padded_batch

METHODS = ["keyformer", "h2o", "streamingllm"]


def report(optimized, phase: str, method: str):
    """The first report of pass ``method`` on ``phase``'s graph."""
    return next(r for r in optimized.reports[phase] if r.pass_name == method)


@pytest.mark.parametrize("method,family", [("keyformer", "llama"), ("keyformer", "gpt2"), ("keyformer", "gemma"),
                                           ("h2o", "qwen2"), ("h2o", "phi3"), ("streamingllm", "mistral")])
def test_a_budget_covering_the_context_reproduces_dense_greedy(method, family):
    model = tokenpass.tiny(family)
    optimized = tokenpass.optimize(model, passes=[f"{method}:kv_budget=4096"])
    counts = {phase: report(optimized, phase, method).counts for phase in ("prefill", "decode")}
    layers = model.config.num_hidden_layers
    assert counts["decode"] == {("evicting_layers" if method == "streamingllm" else "scored_layers"): layers}
    assert counts["prefill"] == counts["decode"]
    ids, mask = padded_batch(model.config.vocab_size, length=30, pad=7)
    assert torch.equal(optimized.generate(ids, mask, max_new_tokens=24), hf_greedy(model, ids, mask, 24))


class _MaskedEvictionReference:
    """The methods written plainly as HF attention over HF's full cache (batch 1, no padding): evicted
    positions are masked per KV head, scores accumulate per position, eviction follows the rules."""

    def __init__(self, budget: float, recent_ratio: float, sinks: int, by_position: bool, noise: bool,
                 tau_init: float, tau_end: float, horizon: int, seed: int):
        self.budget, self.recent_ratio, self.sinks, self.by_position = budget, recent_ratio, sinks, by_position
        self.noise, self.tau, self.horizon, self.seed = noise, (tau_init, tau_end), horizon, seed
        self.scores, self.evicted, self.prompt = {}, {}, None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer, (b, hq, t, d), (hkv, s) = module.layer_idx, query.shape, key.shape[1:3]
        if t > 1:
            self.prompt = s
        positions = torch.arange(s)
        visible = positions[None, :] <= positions[s - t :, None]  # [T, S] causal
        before = self.evicted.get(layer, torch.zeros(b, hkv, 0, dtype=torch.bool))
        evicted = torch.cat([before, torch.zeros(b, hkv, s - before.shape[2], dtype=torch.bool)], -1)
        visible = visible[None, None, None] & ~evicted[:, :, None, None, :]  # [B, Hkv, 1, T, S]
        x = (query.reshape(b, hkv, hq // hkv, t, d) @ key[:, :, None].transpose(-1, -2)) * scaling
        x = x.masked_fill(~visible, float("-inf"))
        out = (x.softmax(-1) @ value[:, :, None]).reshape(b, hq, t, d)
        tau = self.tau[0] if t > 1 else temperature(*self.tau, s - 1 - self.prompt, self.horizon)
        if self.noise:
            x = x + gumbel_noise(self.seed, layer, positions[s - t :][None], positions.expand(b, hkv, s), hq)
        score = torch.cat([self.scores.get(layer, torch.zeros(b, hkv, 0)), torch.zeros(b, hkv, t)], -1)
        self.scores[layer] = score + (x / tau).softmax(-1).sum((2, 3))
        self.evicted[layer] = self._evict(layer, evicted, s)
        return out.transpose(1, 2).contiguous(), None

    def _evict(self, layer: int, evicted: torch.Tensor, s: int) -> torch.Tensor:
        budget = -(-self.prompt * self.budget // 1) if isinstance(self.budget, float) else self.budget
        recent = int(budget * self.recent_ratio)
        positions = torch.arange(s)
        protected = (positions < self.sinks) | (positions > s - 1 - recent)
        rank = positions.float() if self.by_position else self.scores[layer]
        for b, h in itertools.product(*map(range, evicted.shape[:2])):
            live = int((~evicted[b, h]).sum())
            candidates = [j for j in rank.expand(*evicted.shape)[b, h].argsort().tolist()
                          if not evicted[b, h, j] and not protected[j]]
            for j in candidates[: max(0, live - int(budget))]:
                evicted[b, h, j] = True
        return evicted


CASES = {
    "keyformer": ("keyformer:kv_budget=0.5:tau_horizon=8", dict(recent_ratio=0.3, sinks=0, by_position=False,
                                                                  noise=True, tau_init=1.0, tau_end=2.0, horizon=8)),
    "keyformer-noise-free": ("keyformer:kv_budget=0.5:noise=false:seed=3",
                             dict(recent_ratio=0.3, sinks=0, by_position=False, noise=False, tau_init=1.0,
                                  tau_end=2.0, horizon=512)),
    "h2o": ("h2o:kv_budget=0.5", dict(recent_ratio=0.5, sinks=0, by_position=False, noise=False, tau_init=1.0,
                                       tau_end=1.0, horizon=512)),
    "streamingllm": ("streamingllm:kv_budget=20", dict(recent_ratio=0.0, sinks=4, by_position=True, noise=False,
                                                         tau_init=1.0, tau_end=1.0, horizon=512)),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_a_masked_attention_reference_step_by_step(case):
    spec, options = CASES[case]
    model = tokenpass.tiny("qwen2")  # GQA: 4 query heads over 2 KV heads
    context, steps = 40, 14
    ids = torch.randint(3, 300, (1, context + steps), generator=torch.Generator().manual_seed(5))
    optimized = tokenpass.optimize(model, passes=[spec])
    got = teacher_forced(optimized, ids[:, :context], ids[0, context:], case).logprobs
    budget = 20 if case == "streamingllm" else 0.5
    seed = 3 if "seed=3" in spec else 0
    want = hf_reference_logprobs(model, ids, context, steps, "eviction_reference",
                                 _MaskedEvictionReference(budget, seed=seed, **options))
    dense = teacher_forced(tokenpass.optimize(model), ids[:, :context], ids[0, context:], "dense").logprobs
    assert (dense - want).abs().max() > 1e-2  # eviction really changes the predictions ...
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # ... exactly as the method says


@pytest.mark.parametrize("method", METHODS)
def test_a_ragged_left_padded_batch_gives_each_row_what_it_gives_alone(method):
    model = tokenpass.tiny("llama")
    optimized = tokenpass.optimize(model, passes=[f"{method}:kv_budget=0.5"])
    assert_ragged_rows_equal_alone(optimized)


def test_eviction_is_physical_and_memory_stays_flat_over_a_long_generation():
    model = tokenpass.tiny("llama")
    optimized = tokenpass.optimize(model, passes=["keyformer:kv_budget=0.25"])
    dense = tokenpass.optimize(model)
    prompt = torch.randint(3, 300, (1, 400), generator=torch.Generator().manual_seed(0))
    sizes = {}
    for name, opt in (("keyformer", optimized), ("dense", dense)):
        session = opt.session(1, capacity=400)
        positions = positions_from_mask(torch.ones_like(prompt))
        session.step(prompt, torch.ones_like(prompt), positions)
        sizes[name] = [(session.cache.nbytes(), session.cache.live_tokens())]
        token = torch.tensor([[5]])
        for i in range(300):
            session.step(token, torch.ones_like(token), torch.tensor([[400 + i]]))
            if i % 50 == 49:
                sizes[name].append((session.cache.nbytes(), session.cache.live_tokens()))
    heads_layers = model.config.num_key_value_heads * model.config.num_hidden_layers
    assert [live for _, live in sizes["keyformer"]] == [100 * heads_layers] * 7  # budget: 25% of 400, every step
    assert len({nbytes for nbytes, _ in sizes["keyformer"]}) == 1  # memory is flat ...
    assert sizes["keyformer"][0][0] < 0.27 * sizes["dense"][0][0]  # ... and a quarter of dense (+ one slot, scores)
    assert sizes["dense"][-1][1] == 700 * heads_layers
    assert session.cache.notes.get(EVICTED) is None  # the dense session evicted nothing


def test_the_eviction_count_is_reported():
    model = tokenpass.tiny("llama")
    optimized = tokenpass.optimize(model, passes=["h2o:kv_budget=10"])
    session = optimized.session(1, capacity=64)
    prompt = torch.arange(3, 33)[None]
    session.step(prompt, torch.ones_like(prompt), positions_from_mask(torch.ones_like(prompt)))
    heads_layers = model.config.num_key_value_heads * model.config.num_hidden_layers
    assert session.cache.notes[EVICTED] == 20 * heads_layers


def test_second_application_is_a_no_op():
    model = tokenpass.tiny("llama")
    optimized = tokenpass.optimize(model, passes=["keyformer", "keyformer"])
    reports = [r for r in optimized.reports["decode"] if r.pass_name == "keyformer"]
    assert reports[0].counts == {"scored_layers": 4} and reports[1].counts == {"already_applied": 1}
    assert not reports[1].modified


def test_without_lowering_the_pass_rewrites_the_explicit_cache():
    """Tokens and refusals there: tests/test_onnx_eviction.py."""
    model = tokenpass.tiny("llama")
    optimized = tokenpass.optimize(model, passes=["canonicalize_attention", "keyformer"], lower=False)
    report = next(r for r in optimized.reports["decode"] if r.pass_name == "keyformer")
    assert report.counts == {"scored_layers": 4, "explicit_cache": 1}
    assert optimized.step_graphs["prefill"].step_outputs == ["kv_queries"]  # noise: the policy scores the prompt


@pytest.mark.parametrize("options,message", [
    (dict(kv_budget=0), "at least 1"), (dict(kv_budget=-0.5), r"must be in \(0, 1\]"),
    (dict(kv_budget=1.5), r"must be in \(0, 1\]"), (dict(kv_budget=0.0), r"must be in \(0, 1\]"),
    (dict(recent_ratio=1.2), "recent_ratio=1.2 must be in"), (dict(tau_init=0.0), "tau_init and tau_end"),
    (dict(tau_horizon=0), "tau_horizon"), (dict(kv_budget="half"), "kv_budget"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(PassError, match=message):
        Keyformer(**options)


def test_bad_sinks_and_cli_budget_strings():
    with pytest.raises(PassError, match="sinks must be"):
        StreamingLLM(sinks=-1)
    from tokenpass.passes import make_pass

    assert make_pass("keyformer:kv_budget=512").kv_budget == 512  # an integer is a count of tokens ...
    assert make_pass("keyformer:kv_budget=0.25").kv_budget == 0.25  # ... a float a fraction of the prompt
    with pytest.raises(PassError, match=r"kv_budget=2.0 as a fraction"):
        make_pass("h2o:kv_budget=2.0")


def test_noise_depends_only_on_positions_and_scores_sum_to_the_query_count():
    positions = torch.arange(10)
    a = gumbel_noise(0, 3, positions[None, 6:], positions.expand(1, 2, 10), 4)
    shifted = gumbel_noise(0, 3, positions[None, 6:], positions.expand(1, 2, 10).roll(3, -1), 4)
    assert torch.equal(a, shifted.roll(-3, -1))  # keyed by position, not by slot
    assert not torch.equal(a, gumbel_noise(1, 3, positions[None, 6:], positions.expand(1, 2, 10), 4))
    assert abs(float(gumbel_noise(0, 0, positions[None], torch.arange(4096).expand(1, 1, 4096), 1).mean())
               - 0.5772) < 0.02  # Gumbel(0, 1) has mean Euler's gamma
    one = gumbel_noise(0, 3, positions[None, 9:], positions.expand(1, 2, 10), 4)  # a decode step: its own path
    assert torch.equal(one, gumbel_noise(0, 3, positions[None, 9:], positions.expand(1, 2, 10).roll(3, -1), 4)
                       .roll(-3, -1))
    keys = torch.arange(20000).expand(1, 2, -1)
    steps = torch.stack([gumbel_noise(0, 3, torch.tensor([[p]]), keys, 4) for p in (20000, 20001)])
    assert abs(float(steps.mean()) - 0.5772) < 0.02 and abs(float(steps.std()) - 1.2825) < 0.02  # pi / sqrt(6)
    assert torch.corrcoef(steps.reshape(8, -1)).triu(1).abs().max() < 0.03  # heads and steps draw apart
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 10, 8)
    _, contribution = scored_attention_reference(q, k, k, None, 0.3, noise=True, tau=1.5,
                                                 query_positions=positions[None, 7:],
                                                 slot_positions=positions.expand(1, 2, 10))
    torch.testing.assert_close(contribution.sum(-1), torch.full((1, 2), 2 * 3.0))  # G queries x T rows each sum to 1


def test_inspect_shows_the_scored_ops_the_score_state_and_the_policy():
    from typer.testing import CliRunner

    from tokenpass.cli import app

    result = CliRunner().invoke(app, ["inspect", "llama", "--passes", "keyformer:kv_budget=0.25"])
    assert result.exit_code == 0, result.output
    assert "tokenpass.scored_attention" in result.output and "scored_layers=4" in result.output
    assert "slot state kvevict.scores (float32, slot_major, layers 0-3)" in result.output
    assert "policy kvevict(budget=0.25, interval=1, recent_ratio=0.3, score=accumulated)" in result.output


def test_smollm2_keyformer_at_half_the_prompt_keeps_quality_on_real_text(smollm2_optimized):
    """Quality bound on real text: Keyformer keeping half of a 1024-token prompt's cache (measured over
    128 tokens: ppl ratio 1.022, top-1 0.945; docs/benchmarks.md)."""
    from tokenpass.api import fork, optimize_graphs
    from tokenpass.bench import compare
    from tokenpass.models import load_tokenizer
    from tokenpass.texts import read_text, token_ids

    ids = torch.tensor(token_ids(load_tokenizer(), read_text(), 1024 + 64)).view(1, -1)
    prompt, cont = ids[:, :1024], ids[0, 1024:]
    keyformer = optimize_graphs(fork(smollm2_optimized.graphs), [Keyformer(kv_budget=0.5)])
    run = teacher_forced(keyformer, prompt, cont, "keyformer")
    figures = compare(run, teacher_forced(smollm2_optimized, prompt, cont, "dense"), cont, 1024)
    assert figures["ppl_ratio"] < 1.06 and figures["top1_agreement"] > 0.85, figures
    assert figures["kl"] > 0  # eviction happened: the model is not the dense one
    assert run.kv_bytes < 0.6 * (1024 + 64) * 30 * 3 * 64 * 2 * 4  # about half the dense cache's keys and values


@pytest.mark.parametrize("noise,softcap", [(True, None), (False, 30.0)])
def test_the_decode_kernel_with_its_scores_equals_the_reference(noise, softcap):
    """The CUDA path (Triton decode kernel returning its scores, then the score's softmax), run here under
    the Triton interpreter, against the torch reference: output and contribution."""
    from tokenpass.kernels.decode_attention import decode_attention
    from tokenpass.kernels.scored_attention_ref import score_contribution

    g = torch.Generator().manual_seed(0)
    query, keys, values = torch.randn(2, 6, 1, 16, generator=g), torch.randn(2, 2, 37, 16, generator=g), \
        torch.randn(2, 2, 37, 16, generator=g)
    valid = torch.rand(2, 2, 37, generator=g) > 0.3
    valid[..., -1] = True
    qpos, kpos = torch.tensor([[40], [52]]), torch.arange(37).expand(2, 2, 37) * 2
    out, scores = decode_attention(query, keys, values, valid, 0.25, return_scores=True, softcap=softcap)
    contribution = score_contribution(scores[:, :, :, None], 1.7, noise, 3, 5, qpos, kpos)
    want_out, want = scored_attention_reference(query, keys, values, valid, 0.25, query_positions=qpos,
                                                slot_positions=kpos, tau=1.7, noise=noise, seed=3, layer=5,
                                                softcap=softcap)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(contribution, want, atol=1e-5, rtol=1e-5)
    assert (contribution[~valid] == 0).all()


def test_an_eviction_interval_bounds_the_cache_by_budget_plus_interval():
    """With ``evict_interval=5`` a sequence holds at most budget + 4 slots, and exactly the budget right
    after each eviction."""
    model = tokenpass.tiny("llama")
    optimized = tokenpass.optimize(model, passes=["h2o:kv_budget=20:evict_interval=5"])
    session = optimized.session(1, capacity=64)
    prompt = torch.arange(3, 43)[None]
    session.step(prompt, torch.ones_like(prompt), positions_from_mask(torch.ones_like(prompt)))
    per_head = model.config.num_key_value_heads * model.config.num_hidden_layers
    live = [session.cache.live_tokens() // per_head]
    for i in range(12):
        session.step(torch.tensor([[7]]), torch.ones(1, 1), torch.tensor([[40 + i]]))
        live.append(session.cache.live_tokens() // per_head)
    assert live == [20, 21, 22, 23, 24, 20, 21, 22, 23, 24, 20, 21, 22]
    with pytest.raises(PassError, match="evict_interval must be"):
        Keyformer(evict_interval=0)
