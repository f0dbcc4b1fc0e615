"""TokenSelect: exactness when the parts cover the cache, a masked reference, batches, cache hits, errors."""

import pytest
import torch

import tokenpass
from tokenpass.bench import teacher_forced
from tokenpass.errors import PassError
from tokenpass.methods.tokenselect import HITS, LOOKUPS, TokenSelect
from tokenpass.models import TINY_FAMILIES
from tokenpass.runtime.generate import positions_from_mask

from conftest import assert_ragged_rows_equal_alone, hf_greedy, hf_reference_logprobs, hf_tiny, padded_batch


def report(optimized, phase: str = "decode"):
    return next(r for r in optimized.reports[phase] if r.pass_name == "tokenselect")


@pytest.mark.parametrize("family", TINY_FAMILIES[:3])
def test_parts_covering_the_cache_reproduce_dense_greedy(family):
    model = tokenpass.tiny(family)
    optimized = tokenpass.optimize(model, passes=["tokenselect:top_k=64:n_local=8"])
    assert report(optimized).counts == {"selecting_layers": model.config.num_hidden_layers}
    ids, mask = padded_batch(model.config.vocab_size, length=30, pad=7)
    assert torch.equal(optimized.generate(ids, mask, max_new_tokens=24), hf_greedy(model, ids, mask, 24))


class _MaskedTokenSelectReference:
    """TokenSelect written plainly as HF attention (batch 1): candidates scored by every query head,
    soft-voted, the top_k plus the first and the recent tokens kept, the rest masked; the selection
    cache compares the flattened query with the one that made the layer's last selection. With the model's
    ``rotary`` embedding, positions are contiguous as the paper builds them: query and kept keys are
    un-rotated, then rotated again at positions 0..n-1 of the kept list (the query last)."""

    def __init__(self, n_init: int, n_local: int, top_k: int, theta: float | None, rotary=None):
        self.n_init, self.n_local, self.top_k, self.theta, self.rotary = n_init, n_local, top_k, theta, rotary
        self.stored, self.lookups, self.hits = {}, 0, 0

    def turn(self, x, positions):
        """``x`` ``[1, H, n, D]`` rotated by ``positions`` ``[n]`` with the model's own embedding."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cos, sin = self.rotary(x, positions[None])
        return apply_rotary_pos_emb(x, x, cos, sin)[0]

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        s = key.shape[2]
        if query.shape[2] > 1 or self.n_init + self.top_k + self.n_local >= s:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        group = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        scores = (query @ k.transpose(-1, -2)) * scaling  # [1, H, 1, S]
        positions = torch.arange(s)
        fixed = (positions < self.n_init) | (positions > s - 1 - self.n_local)
        layer, flat = module.layer_idx, query.reshape(-1)
        stored = self.stored.get(layer)
        self.lookups += 1
        if stored is not None and self.theta is not None and \
                torch.nn.functional.cosine_similarity(flat, stored[0], dim=0) >= self.theta:
            self.hits += 1
            selected = stored[1]
        else:
            votes = scores.masked_fill(fixed, float("-inf")).softmax(-1).sum((0, 1, 2))
            selected = votes.masked_fill(fixed, float("-inf")).topk(self.top_k).indices
            self.stored[layer] = (flat, selected)
        keep = fixed.clone()
        keep[selected] |= ~fixed[selected]
        if self.rotary is not None:
            kept = keep.nonzero()[:, 0]
            n = torch.arange(len(kept))
            k = self.turn(self.turn(key[:, :, kept], -kept), n).repeat_interleave(group, 1)
            q = self.turn(self.turn(query, torch.tensor([1 - s])), n[-1:])
            scores = (q @ k.transpose(-1, -2)) * scaling
            return (scores.softmax(-1) @ v[:, :, kept]).transpose(1, 2).contiguous(), None
        scores = scores.masked_fill(~keep, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("theta,positions", [(None, "original"), (0.3, "original"), (None, "contiguous")],
                         ids=["no-selection-cache", "selection-cache", "contiguous-positions"])
def test_logits_equal_a_masked_attention_reference_step_by_step(theta, positions):
    """Contiguous positions run on a model whose positions (max_position_embeddings 40) the context
    outgrows, as the paper's length-extrapolation claim has it; the reference builds them its own way,
    so the original-position run differs from it by 0.08 in log-probability."""
    model = tokenpass.tiny("qwen2")
    model.config.max_position_embeddings = 40
    context, steps = 48, 14
    ids = torch.randint(3, 300, (1, context + steps), generator=torch.Generator().manual_seed(4))
    spec = f"tokenselect:top_k=6:n_init=2:n_local=5:theta={theta}:positions={positions}"
    optimized = tokenpass.optimize(model, passes=[spec])
    session = optimized.session(1, capacity=context + steps)
    prompt_positions = positions_from_mask(torch.ones_like(ids[:, :context]))
    got = [session.step(ids[:, :context], torch.ones_like(ids[:, :context]), prompt_positions)[0, -1].log_softmax(-1)]
    for i in range(steps - 1):
        logits = session.step(ids[:, context + i : context + i + 1], torch.ones(1, 1), torch.tensor([[context + i]]))
        got.append(logits[0, -1].log_softmax(-1))
    rotary = model.model.rotary_emb if positions == "contiguous" else None
    reference = _MaskedTokenSelectReference(2, 5, 6, theta, rotary)
    want = hf_reference_logprobs(model, ids, context, steps, "tokenselect_reference", reference)
    got = torch.stack(got)
    dense = teacher_forced(tokenpass.optimize(model), ids[:, :context], ids[0, context:], "dense").logprobs
    assert (dense - want).abs().max() > 1e-2  # selection really changes the predictions ...
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # ... exactly as the method says
    assert session.cache.notes[LOOKUPS] == reference.lookups
    assert session.cache.notes[HITS] == reference.hits
    assert (reference.hits > 0) == (theta is not None)


@pytest.mark.parametrize("positions", ["original", "contiguous"])
def test_a_ragged_left_padded_batch_gives_each_row_what_it_gives_alone(positions):
    model = tokenpass.tiny("llama")
    optimized = tokenpass.optimize(model, [f"tokenselect:top_k=6:n_init=2:n_local=5:theta=0.5:positions={positions}"])
    layers = model.config.num_hidden_layers
    assert report(optimized).counts == {"selecting_layers": layers} | (
        {"repositioned_layers": layers} if positions == "contiguous" else {})
    assert_ragged_rows_equal_alone(optimized)


@pytest.mark.parametrize("model,lower,reason", [
    ("gpt2", True, "layer 0 attention .*: rotary keys .* is not the sum x \\* cos \\+ rotate_half"),
    ("llama", False, "positions='contiguous' re-rotates keys by the positions the runtime's cache keeps"),
], ids=["learned-positions", "explicit-cache"])
def test_contiguous_positions_are_refused_with_their_reason(model, lower, reason):
    """Negative: no rotary embedding to move keys with (gpt2's learned positions), or no runtime cache."""
    passes = [TokenSelect(theta=None, positions="contiguous")]
    with pytest.raises(PassError, match=f"could not apply: .*{reason}"):
        tokenpass.optimize(tokenpass.tiny(model), passes if lower else ["canonicalize_attention", *passes],
                           lower=lower)


def test_second_application_is_a_no_op_and_prefill_is_untouched():
    optimized = tokenpass.optimize(tokenpass.tiny("llama"), passes=["tokenselect", "tokenselect"])
    reports = [r for r in optimized.reports["decode"] if r.pass_name == "tokenselect"]
    assert reports[0].counts == {"selecting_layers": 4} and reports[1].counts == {"already_applied": 1}
    assert report(optimized, "prefill").skipped


@pytest.mark.parametrize("options,message", [
    (dict(top_k=0), "top_k must be"), (dict(n_init=-1), "n_init must be"), (dict(n_local=0), "n_local must be"),
    (dict(theta=1.5), r"theta must be in \[0, 1\]"), (dict(theta=-0.1), r"theta must be in \[0, 1\]"),
    (dict(positions="absolute"), "positions.*one of 'original', 'contiguous'"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(PassError, match=message):
        TokenSelect(**options)


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_the_vote_kernel_equals_the_reference(softcap):
    """The Triton soft vote (run here under the interpreter) against the torch reference, GQA, with rows
    whose candidates differ and one row without any."""
    from tokenpass.kernels.token_select_ref import soft_vote
    from tokenpass.kernels.token_select_vote import soft_vote_kernel

    g = torch.Generator().manual_seed(1)
    query, keys = torch.randn(3, 6, 1, 16, generator=g), torch.randn(3, 2, 150, 16, generator=g)
    candidates = torch.rand(3, 150, generator=g) > 0.4
    candidates[2] = False
    got = soft_vote_kernel(query, keys, candidates, 0.25, softcap)
    want = soft_vote(query, keys, candidates, 0.25, softcap)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:2].sum(-1), torch.full((2,), 6.0))  # six heads, each a distribution
    assert (got[2] == 0).all() and (got[~candidates] == 0).all()


EXPLICIT = TokenSelect(top_k=6, n_init=2, n_local=5, theta=None)  # what ONNX exports run


def test_on_explicit_cache_tensors_it_generates_the_runtime_forms_tokens():
    """Positive (explicit form, no selection cache): every layer gets the explicit-cache op, by count,
    and a left-padded batch decodes the runtime form's tokens, which are not dense decoding's."""
    model = tokenpass.tiny("llama")
    explicit = tokenpass.optimize(model, ["canonicalize_attention", EXPLICIT], lower=False)
    assert report(explicit).counts == {"selecting_layers": 4, "explicit_cache": 1}
    ids, mask = padded_batch(model.config.vocab_size, length=24, pad=5)
    tokens = explicit.generate(ids, mask, max_new_tokens=48)
    assert torch.equal(tokens, tokenpass.optimize(model, [EXPLICIT]).generate(ids, mask, max_new_tokens=48))
    assert not torch.equal(tokens, tokenpass.optimize(model, []).generate(ids, mask, max_new_tokens=48))


def test_on_explicit_cache_tensors_a_second_application_is_a_no_op():
    explicit = tokenpass.optimize(tokenpass.tiny("llama"), ["canonicalize_attention", EXPLICIT, EXPLICIT],
                                  lower=False)
    first, second = [r for r in explicit.reports["decode"] if r.pass_name == "tokenselect"]
    assert first.modified and second.counts == {"already_applied": 1}


def test_on_explicit_cache_tensors_the_selection_cache_is_refused_with_its_reason():
    """Negative (explicit form): theta reuses selections the runtime keeps between steps."""
    with pytest.raises(PassError, match="could not apply: .*theta=0.5 reuses selections kept in the runtime"):
        tokenpass.optimize(tokenpass.tiny("llama"), ["canonicalize_attention", TokenSelect(theta=0.5)], lower=False)


def test_moving_a_rotated_key_equals_rotating_it_at_the_sum_of_positions_partial_rotary_included():
    """``reposition.rotate`` by ``d`` on keys the model rotated at ``p`` gives the model's own rotation at
    ``p + d``, on phi3 with half of each head rotated (the other half passes through untouched)."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    from tokenpass.methods.tokenselect.reposition import rotate

    rotary = hf_tiny("phi3", partial_rotary_factor=0.5).model.rotary_emb
    keys = torch.randn(2, 2, 5, 16, generator=torch.Generator().manual_seed(0))
    at = torch.tensor([[3, 9, 40, 41, 100], [0, 1, 2, 7, 64]])
    shift = torch.tensor([[5, 0, 17, 2, 1000], [1, 1, 30, 0, 3]])

    def turned(positions):
        cos, sin = rotary(keys, positions)
        return apply_rotary_pos_emb(keys, keys, cos, sin)[1]

    torch.testing.assert_close(rotate(turned(at), shift, rotary.inv_freq, 8), turned(at + shift), atol=1e-5, rtol=0)


@pytest.mark.parametrize("positions", ["original", "contiguous"])
def test_smollm2_keeps_quality_on_real_text(smollm2_optimized, positions):
    """Quality bound on real text: a 1024-token prompt read through 4 + 128 + 32 tokens a step (measured
    over 64 tokens: ppl ratio 1.027 / 0.977, top-1 0.844 / 0.875 for original / contiguous positions)."""
    from tokenpass.api import fork, optimize_graphs
    from tokenpass.bench import compare
    from tokenpass.models import load_tokenizer
    from tokenpass.texts import read_text, token_ids

    ids = torch.tensor(token_ids(load_tokenizer(), read_text(), 1024 + 64)).view(1, -1)
    prompt, cont = ids[:, :1024], ids[0, 1024:]
    select = TokenSelect(top_k=128, n_local=32, theta=None, positions=positions)
    run = teacher_forced(optimize_graphs(fork(smollm2_optimized.graphs), [select]), prompt, cont, "tokenselect")
    figures = compare(run, teacher_forced(smollm2_optimized, prompt, cont, "dense"), cont, 1024)
    assert figures["ppl_ratio"] < 1.06 and figures["top1_agreement"] > 0.8, figures
    assert figures["kl"] > 0  # selection happened: the model is not the dense one
