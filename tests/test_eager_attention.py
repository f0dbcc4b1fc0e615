"""Eager attention (matmul / scale / soft-cap / mask / softmax / matmul) canonicalised into tokenpass.attention."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import tokenpass
from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.ops import attention_op
from tokenpass.kernels.attention_ref import eager_attention_reference, expand_kv_heads
from tokenpass.passes import PassManager
from tokenpass.passes.canonicalize_attention import CanonicalizeAttention, attention_softcap
from tokenpass.passes.eager_attention import match_eager_attention

from conftest import hf_greedy, padded_batch, reference_logits

aten = torch.ops.aten
LAYERS = 4
# Families that capture with eager attention; gemma2 and falcon are built here (not tiny families).
EAGER_FAMILIES = ("llama", "qwen2", "gpt2", "mistral", "phi3", "gemma", "falcon", "gemma2")


def _eager_model(family: str):
    """A tiny model of ``family`` that runs HF's eager attention."""
    torch.manual_seed(0)
    if family == "gemma2":  # soft-capped attention logits, query_pre_attn_scalar scaling, sliding windows
        config = transformers.Gemma2Config(
            vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=512,
        )
    elif family == "falcon":  # multi-query attention; scores divided in place (div_)
        config = transformers.AutoConfig.for_model(
            "falcon", vocab_size=320, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
            max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        )
    else:
        model = tokenpass.tiny(family)
        model.set_attn_implementation("eager")
        return model
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _decode_graph(family: str) -> TokenGraph:
    return tokenpass.capture(_eager_model(family), phases=("decode",))["decode"]


def _count(graph: TokenGraph, target) -> int:
    return sum(1 for n in graph.graph.nodes if n.target == target)


@pytest.mark.parametrize("family", EAGER_FAMILIES)
def test_every_eager_layer_becomes_an_ordinary_attention_site(family):
    graph = _decode_graph(family)
    assert not graph.sites().attention  # no attention op before canonicalisation
    canon, _ = PassManager(["canonicalize_attention", "dce"], verify=True).run(graph)
    assert canon.counts["eager_to_tokenpass_attention"] == LAYERS and not canon.misses
    assert canon.counts["softcap_attention"] == (LAYERS if family == "gemma2" else 0)
    sites = graph.sites().attention
    assert [s.layer for s in sites] == list(range(LAYERS)) and {s.op for s in sites} == {"tokenpass.attention"}
    assert all(s.key_cache.past == f"past_keys_{s.layer}" and s.value_cache.present for s in sites)
    assert all(s.mask is not None and not s.is_causal for s in sites)
    # The eager chain is gone: no softmax, and no matmul of 4-d activations.
    assert _count(graph, aten.softmax.int) == 0
    assert not any(n.target == aten.matmul.default and n.meta["val"].dim() == 4 for n in graph.graph.nodes)
    new = graph.node(next(iter(canon.replaced.values())))
    assert new.meta["tokenpass"] == {"pass": "canonicalize_attention", "replaces": next(iter(canon.replaced))}


def test_gemma2_soft_cap_and_scale_are_read_from_the_graph():
    graph = _decode_graph("gemma2")
    PassManager(["canonicalize_attention"]).run(graph)
    nodes = [n for n in graph.graph.nodes if n.target == attention_op]
    assert [attention_softcap(n) for n in nodes] == [50.0] * LAYERS  # attn_logit_softcapping
    assert {s.scale for s in graph.sites().attention} == {256**-0.5}  # query_pre_attn_scalar, not head_dim
    assert _count(graph, aten.tanh.default) == 1  # only the final logit soft-cap is left


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma2"])
def test_canonical_eager_model_reproduces_hf_eager(family):
    model = _eager_model(family)
    ids, mask = padded_batch(model.config.vocab_size)
    optimized = tokenpass.optimize(model, passes=["canonicalize_attention", "dce"], lower=False, verify=True)
    assert all(r[0].counts["eager_to_tokenpass_attention"] == LAYERS for r in optimized.reports.values())
    real = mask.bool()
    # Bit-identical: the op's reference runs HF's eager formula for additive masks and soft-caps.
    assert torch.equal(optimized(ids, mask)[real], reference_logits(model, ids, mask)[real])


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_eager_model_runs_on_the_runtime_cache_and_generates_like_hf(family):
    model = _eager_model(family)
    ids, mask = padded_batch(model.config.vocab_size)
    optimized = tokenpass.optimize(model)
    assert all(r[1].counts["attention_on_runtime_cache"] == LAYERS for r in optimized.reports.values())
    real = mask.bool()
    torch.testing.assert_close(optimized(ids, mask)[real], reference_logits(model, ids, mask)[real], rtol=0, atol=1e-5)
    assert torch.equal(optimized.generate(ids, mask, max_new_tokens=16), hf_greedy(model, ids, mask, 16))


def test_passes_are_idempotent_on_eager_graphs():
    graph = _decode_graph("qwen2")
    (canon,) = PassManager(["canonicalize_attention"]).run(graph)
    (again,) = PassManager(["canonicalize_attention"]).run(graph)  # dead chain still there: not re-matched
    assert canon.modified and not again.modified and not again.misses
    assert again.counts == {"already_canonical": LAYERS}
    PassManager(["dce"]).run(graph)
    version = graph.version
    results = PassManager(["canonicalize_attention", "dce"]).run(graph)
    assert [r.modified for r in results] == [False, False] and graph.version == version


def test_eager_graph_is_applicable_and_the_miss_text_no_longer_asks_for_sdpa():
    graph = _decode_graph("llama")
    (result,) = PassManager(["canonicalize_attention"]).run(graph)
    assert result.applicable and result.modified and not result.misses


# Hand-written modules: the matcher keys on what the graph computes, not on transformers' code.
class _Attention(nn.Module):
    """Eager attention over ``[B,H,T,D]`` inputs with one knob broken per variant."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant

    def forward(self, q, k, v, mask):
        if self.variant == "keys_not_transposed":  # k is already [B,H,D,S]
            w = torch.matmul(q, k.transpose(2, 3).contiguous()) * 0.25
        elif self.variant == "scale_after_mask":  # the mask gets scaled too: not the canonical op
            w = (torch.matmul(q, k.transpose(2, 3)) + mask) * 0.25
        else:
            w = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
        dim = 1 if self.variant == "softmax_over_heads" else -1
        return torch.matmul(torch.softmax(w, dim=dim, dtype=torch.float32).to(q.dtype), v)


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    mask = torch.where(torch.rand(2, 1, 5, 5, generator=g) > 0.3, 0.0, torch.finfo(torch.float32).min)
    return q, k, v, mask


def _exported(variant: str) -> TokenGraph:
    return TokenGraph(torch.export.export(_Attention(variant), _inputs()))


def test_a_hand_written_attention_module_is_canonicalised_exactly():
    graph = _exported("attention")
    want = graph(*_inputs())
    ((match,), misses) = match_eager_attention(graph.graph)
    assert not misses and match.scale == 0.25 and match.softcap is None and match.mask.name == "mask"
    assert [n.target for n in match.identities] == [aten.to.dtype]
    result = CanonicalizeAttention()(graph)
    assert result.counts["eager_to_tokenpass_attention"] == 1 and graph.sites().attention[0].layer == 0
    assert torch.equal(graph(*_inputs()), want)


@pytest.mark.parametrize(
    "variant,check",
    [
        ("softmax_over_heads", "softmax over the last axis"),
        ("scale_after_mask", "scores from matmul(q, k^T)"),
        ("keys_not_transposed", "keys transposed on their last two axes"),
    ],
)
def test_softmax_next_to_a_matmul_that_is_not_attention_is_a_miss(variant, check):
    graph = _exported(variant)
    before = [n.format_node() for n in graph.graph.nodes]
    result = CanonicalizeAttention()(graph)
    assert not result.modified and not result.applicable and graph.version == 0
    assert [n.format_node() for n in graph.graph.nodes] == before
    eager_miss, no_attention = result.misses
    assert eager_miss.site == "attention (softmax)" and eager_miss.check == check
    assert no_attention.check == "attention op present" and "'eager'" in no_attention.reason


def test_eager_reference_agrees_with_sdpa_on_every_mask_kind():
    q, k, v, _ = _inputs()
    k, v = k[:, :2], v[:, :2]  # grouped-query: 4 query heads read 2 KV heads
    keep = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    keep[0, 0, 1] = False  # a query row with nothing to attend to: zeros, as SDPA gives
    for mask, causal in ((keep, False), (torch.where(keep, 0.0, float("-inf")), False), (None, True), (None, False)):
        want = F.scaled_dot_product_attention(
            q, expand_kv_heads(k, 4), expand_kv_heads(v, 4), attn_mask=mask, scale=0.3, is_causal=causal
        )
        torch.testing.assert_close(eager_attention_reference(q, k, v, mask, 0.3, causal), want, rtol=0, atol=1e-6)
    capped = eager_attention_reference(q, k, v, None, 0.3, False, softcap=0.5)  # |logits| < 0.5 after the cap
    scores = torch.tanh(q @ expand_kv_heads(k, 4).transpose(2, 3) * 0.3 / 0.5) * 0.5
    torch.testing.assert_close(capped, torch.softmax(scores, -1) @ expand_kv_heads(v, 4), rtol=0, atol=1e-6)
