"""Lowering passes (runtime KV cache, no-op elimination, logit-row selection) and the generation API."""

import pytest
import torch

import tokenpass
from tokenpass.errors import TokenpassError
from tokenpass.ir.ops import RUNTIME_CACHE, cached_attention_op
from tokenpass.passes import PassManager
from tokenpass.runtime.executor import new_cache, run_step

from conftest import hf_greedy, padded_batch

aten = torch.ops.aten


def _graph(family="llama", phase="prefill", passes=("canonicalize_attention",)):
    graph = tokenpass.capture(tokenpass.tiny(family), phases=(phase,))[phase]
    PassManager(list(passes)).run(graph)
    return graph


def test_lower_kv_cache_moves_attention_onto_the_runtime_cache():
    graph = _graph()
    (lower, dce) = PassManager(["lower_kv_cache", "dce"], verify=True).run(graph)  # verify: outputs unchanged
    assert lower.counts["attention_on_runtime_cache"] == 4 and len(lower.replaced) == 4
    assert sum(n.target == cached_attention_op for n in graph.graph.nodes) == 4
    assert not any(n.target == aten.cat.default and n.args[1] in (-2, 2) for n in graph.graph.nodes)  # no cache cats
    assert {s.key_cache.past for s in graph.sites().attention} == {RUNTIME_CACHE}
    assert "runtime_kv_cache" in graph.properties and dce.counts["nodes_removed"] > 0


def test_lower_kv_cache_needs_canonical_attention():
    graph = _graph(passes=())
    with pytest.raises(tokenpass.PassOrderError, match="'lower_kv_cache' requires attention_canonical"):
        PassManager(["lower_kv_cache"]).run(graph)


def test_lower_kv_cache_explains_a_site_without_a_cache_update():
    graph = _graph()
    site = graph.sites().attention[2]
    cat = graph.node(site.value_cache.present)
    (out,) = [n for n in graph.graph.nodes if n.op == "output"]
    out.replace_input_with(cat, cat.args[0][1])  # the graph no longer returns layer 2's value cache
    graph.mark_changed()
    (result,) = PassManager(["lower_kv_cache"]).run(graph)
    assert result.counts["attention_on_runtime_cache"] == 0 and not result.modified  # all or nothing
    assert "runtime_kv_cache" not in graph.properties and not graph.reads_runtime_cache()
    (miss,) = result.misses
    assert miss.site.startswith("layer 2 attention") and miss.check == "values cache update found"


def test_lowering_is_idempotent():
    graph = _graph(passes=("canonicalize_attention", "lower_kv_cache", "eliminate_noops", "dce", "select_logit_rows"))
    version = graph.version
    again = PassManager(["lower_kv_cache", "eliminate_noops", "dce", "select_logit_rows"]).run(graph)
    assert not any(r.modified for r in again) and graph.version == version
    assert again[0].counts["already_lowered"] == 4 and again[3].counts["already_selected"] == 1


def test_eliminate_noops_removes_asserts_casts_and_full_slices_exactly():
    graph = _graph()
    (result,) = PassManager(["eliminate_noops"], verify=True).run(graph)
    assert result.counts["dtype_asserts_removed"] > 0 and result.counts["same_dtype_casts_removed"] > 0
    assert not any(n.target == aten._assert_tensor_metadata.default for n in graph.graph.nodes)
    (again,) = PassManager(["eliminate_noops"]).run(graph)
    assert not again.modified


def test_select_logit_rows_computes_only_the_asked_rows():
    graph = _graph(passes=("canonicalize_attention", "lower_kv_cache", "eliminate_noops", "dce"))
    (result,) = PassManager(["select_logit_rows"], verify=True).run(graph)
    assert result.counts["lm_head_rows_selected"] == 1
    ids = torch.randint(3, 300, (2, 9))
    positions = torch.arange(9).expand(2, 9)
    full = run_step(graph, new_cache({"prefill": graph}, 2), ids, torch.ones_like(ids), positions)
    last = run_step(graph, new_cache({"prefill": graph}, 2), ids, torch.ones_like(ids), positions, last_only=True)
    assert full.shape == (2, 9, 320) and last.shape == (2, 1, 320)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=0, atol=1e-5)


def test_select_logit_rows_refuses_while_the_mask_is_still_used():
    graph = _graph(passes=("canonicalize_attention", "lower_kv_cache"))
    (result,) = PassManager(["select_logit_rows"]).run(graph)
    assert not result.applicable and "run lower_kv_cache and dce first" in result.misses[0].reason


@pytest.fixture(scope="module")
def llama():
    model = tokenpass.tiny("llama")
    return model, tokenpass.optimize(model)


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(llama):
    model, optimized = llama
    ids, mask = padded_batch(320)
    a = optimized.generate(ids, mask, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, seed=7)
    b = optimized.generate(ids, mask, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, seed=7)
    c = optimized.generate(ids, mask, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = optimized.generate(ids, mask, max_new_tokens=12, do_sample=True, top_k=1, seed=1)
    assert torch.equal(greedy, hf_greedy(model, ids, mask, 12))


def test_streamer_sees_every_new_token_in_order(llama):
    _, optimized = llama
    ids, mask = padded_batch(320)
    seen = []
    out = optimized.generate(ids, mask, max_new_tokens=6, streamer=seen.append)
    assert torch.equal(torch.stack(seen, dim=1), out[:, ids.shape[1]:])


@pytest.mark.parametrize("kwargs,message", [
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(max_new_tokens=-1), "max_new_tokens must be a non-negative integer"),
])
def test_bad_generation_arguments(llama, kwargs, message):
    _, optimized = llama
    with pytest.raises(TokenpassError, match=message):
        optimized.generate(torch.ones((1, 3), dtype=torch.long), **kwargs)


def test_canonicalize_after_lowering_is_a_no_op():
    graph = _graph(passes=("canonicalize_attention", "lower_kv_cache"))
    (result,) = PassManager(["canonicalize_attention"]).run(graph)
    assert not result.modified and result.counts["already_canonical"] == 4


def _eager_with_an_odd_layer(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF's eager attention, except that layer 2 routes its probabilities through ``* 1.0``: the same
    function, but a chain the canonicalisation does not recognise as attention."""
    from transformers.models.llama.modeling_llama import eager_attention_forward, repeat_kv

    if module.layer_idx != 2:
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    k, v = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    probs = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype) * 1.0
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


def test_a_graph_with_one_unrecognised_attention_layer_is_not_lowered_and_runs_exactly():
    """The issue's 'partly lowered graph': three layers canonicalise, layer 2 does not. Lowering the three
    would leave layer 2 reading a past the runtime feeds empty; instead nothing is lowered, a warning names
    the layer, and generation equals HF's."""
    from transformers import AttentionInterface

    AttentionInterface.register("odd_layer_eager", _eager_with_an_odd_layer)
    model = tokenpass.tiny("llama")
    model.set_attn_implementation("odd_layer_eager")
    with pytest.warns(tokenpass.TokenpassWarning, match=r"llama/decode runs without the runtime KV cache.*layer 2"):
        optimized = tokenpass.optimize(model)
    canon = optimized.reports["decode"][0]
    assert canon.counts["eager_to_tokenpass_attention"] == 3 and not canon.applicable
    assert not optimized.lowered and "runtime_kv_cache" not in optimized.graphs["decode"].properties
    ids, mask = padded_batch(model.config.vocab_size, length=20, pad=5)
    assert torch.equal(optimized.generate(ids, mask, max_new_tokens=16), hf_greedy(model, ids, mask, 16))
