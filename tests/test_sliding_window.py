"""Sliding-window and mixed local/global attention on the runtime cache: exact, or refused, never wrong.

Each family is built from transformers' own config class with a window (8) much shorter than the prompt
(30 tokens, row 0 left-padded by 5), and generates 64 greedy tokens; the reference is HF's uncached
forward recomputed at every step (``hf_recompute_greedy``).
"""

import dataclasses

import pytest
import torch

import tokenpass
from tokenpass.passes import PassManager

from conftest import hf_recompute_greedy, hf_tiny, padded_batch

WINDOW = 8
FAMILIES = {
    "mistral": dict(model_type="mistral", sliding_window=WINDOW),  # every layer windowed (Mistral v0.1)
    "qwen2": dict(model_type="qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "gemma3": dict(model_type="gemma3_text", sliding_window=WINDOW, head_dim=16,
                   layer_types=["sliding_attention", "full_attention"] * 2),
    # HF runs Gemma 2 with eager attention only: attention-logit soft-capping between QK and softmax,
    # alternating local/global layers, and a final logit soft-cap after the LM head.
    "gemma2": dict(model_type="gemma2", attn="eager", sliding_window=WINDOW, head_dim=16),
}


def windowed_layers(model) -> int:
    kinds = getattr(model.config, "layer_types", None)
    return sum(kind == "sliding_attention" for kind in kinds) if kinds else model.config.num_hidden_layers


@pytest.mark.parametrize("name", FAMILIES)
def test_windowed_family_is_lowered_and_exact_over_64_tokens(name):
    options = dict(FAMILIES[name])
    model = hf_tiny(options.pop("model_type"), **options)
    optimized = tokenpass.optimize(model)
    assert optimized.lowered
    lowering = next(r for r in optimized.reports["decode"] if r.pass_name == "lower_kv_cache")
    assert lowering.counts["sliding_window_layers"] == windowed_layers(model) > 0
    capped = getattr(model.config, "attn_logit_softcapping", None) is not None
    assert lowering.counts["softcap_layers"] == (model.config.num_hidden_layers if capped else 0)
    ids, mask = padded_batch(model.config.vocab_size, length=30, pad=5)
    assert torch.equal(optimized.generate(ids, mask, max_new_tokens=64), hf_recompute_greedy(model, ids, mask, 64))


def test_a_window_the_config_does_not_declare_is_refused_naming_the_layer():
    """The lowering checks the masks the graph computes: a spec that forgets the window is caught."""
    model = hf_tiny("mistral", sliding_window=WINDOW)
    graph = tokenpass.capture(model, phases=("prefill",))["prefill"]
    graph.spec = dataclasses.replace(graph.spec, layer_windows=(0, 0, 0, 0))  # what a lying config would say
    _, lowering = PassManager(["canonicalize_attention", "lower_kv_cache"]).run(graph)
    assert not lowering.modified and "runtime_kv_cache" not in graph.properties
    assert len(lowering.misses) == 4
    miss = lowering.misses[0]
    assert miss.site.startswith("layer 0 attention") and miss.check == "mask is causal + padding"
    assert "hides key" in miss.reason


def test_windowed_layers_stay_windowed_dense_under_tidaldecode():
    """Mixed layers [full, full, sliding, full, sliding, full]: layer 1 selects, sliding layers 2 and 4
    attend over their window, full layers 3 and 5 read layer 1's selection."""
    kinds = ["full_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention",
             "full_attention"]
    model = hf_tiny("qwen2", num_hidden_layers=6, use_sliding_window=True, sliding_window=WINDOW, layer_types=kinds)
    ids, mask = padded_batch(model.config.vocab_size, length=30, pad=5)
    covering = tokenpass.optimize(model, passes=["tidaldecode:top_k=512:sparse_start=1:selection_layers=1"])
    counts = next(r for r in covering.reports["decode"] if r.pass_name == "tidaldecode").counts
    assert counts == {"dense_layers": 1, "selection_layers": 1, "windowed_dense_layers": 2, "sparse_layers": 2}
    ops = {s.layer: (s.op, s.window) for s in covering.graphs["decode"].sites().attention}
    assert ops[2] == ops[4] == ("tokenpass.cached_attention", WINDOW) and ops[3][0] == "tokenpass.sparse_attention"
    assert torch.equal(covering.generate(ids, mask, max_new_tokens=24), hf_recompute_greedy(model, ids, mask, 24))
    sparse = tokenpass.optimize(model, passes=["tidaldecode:top_k=4:sparse_start=1:selection_layers=1"])
    assert not torch.equal(sparse.generate(ids, mask, max_new_tokens=24), covering.generate(ids, mask, max_new_tokens=24))


def test_windowed_layers_stay_windowed_dense_on_the_explicit_cache_too():
    """Canonical attention over explicit tensors has its window in the mask only; the methods read it from
    the model's spec, so an ONNX export keeps sliding layers dense as the runtime does (and decodes the
    runtime's tokens), rather than selecting inside the window."""
    kinds = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    model = hf_tiny("qwen2", use_sliding_window=True, sliding_window=WINDOW, layer_types=kinds)
    select = "tokenselect:top_k=2:n_init=1:n_local=2:theta=none"
    explicit = tokenpass.optimize(model, passes=["canonicalize_attention", select], lower=False)
    counts = next(r for r in explicit.reports["decode"] if r.pass_name == "tokenselect").counts
    assert counts == {"selecting_layers": 2, "windowed_dense_layers": 2, "explicit_cache": 1}
    ids, mask = padded_batch(model.config.vocab_size, length=30, pad=5)
    runtime = tokenpass.optimize(model, passes=[select])
    assert torch.equal(explicit.generate(ids, mask, max_new_tokens=24), runtime.generate(ids, mask, max_new_tokens=24))


def test_a_family_the_lowering_cannot_take_runs_exactly_with_a_warning_naming_the_layer():
    """GPT-OSS adds learned attention sinks to the softmax (eager only): not attention as the canonical op
    computes it, so nothing is lowered; the model still generates exactly, and the warning says why."""
    model = hf_tiny("gpt_oss", attn="eager", sliding_window=WINDOW, head_dim=16, num_local_experts=4,
                    num_experts_per_tok=2)
    with pytest.warns(tokenpass.TokenpassWarning, match=r"gpt_oss/decode runs without the runtime KV cache .*"
                                                        r"layer 0 attention"):
        optimized = tokenpass.optimize(model)
    assert not optimized.lowered
    ids, mask = padded_batch(model.config.vocab_size, length=30, pad=5)
    assert torch.equal(optimized.generate(ids, mask, max_new_tokens=64), hf_recompute_greedy(model, ids, mask, 64))
    with pytest.raises(tokenpass.PassError, match="pass 'tidaldecode' could not apply: .*requires attention_canonical"):
        tokenpass.optimize(model, passes=["tidaldecode"])
