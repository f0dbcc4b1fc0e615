"""The LM head is found behind row-wise elementwise ops on the logits (Gemma 2's final soft-capping,
``tanh(head(h) / c) * c``), and select_logit_rows still picks rows before it."""

import pytest
import torch
from torch import nn

import tokenpass
from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.sites import find_lm_head
from tokenpass.passes.select_logit_rows import SelectLogitRows

aten = torch.ops.aten
SOFTCAP_TARGETS = [aten.div.Tensor, aten.tanh.default, aten.mul.Tensor]


def _tiny_gemma2() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=512,
        final_logit_softcapping=30.0,
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def gemma2() -> nn.Module:
    return _tiny_gemma2()


class _LogitsOnly(nn.Module):
    """A step whose ``attention_mask`` input is unused, as after lowering: what select_logit_rows needs.

    (The runtime cannot run Gemma 2's eager, windowed attention yet, so the pass is checked on this
    export of the model's own forward rather than through ``optimize``.)
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return (self.model(input_ids=input_ids, use_cache=False).logits,)


def _graph_of(module: nn.Module, *inputs) -> TokenGraph:
    with torch.no_grad():
        program = torch.export.export(module, inputs, strict=False)
    graph = TokenGraph(program, "prefill")
    graph.properties.add("runtime_kv_cache")  # select_logit_rows' precondition: the mask input is free
    return graph


def _select(graph: TokenGraph, ids: torch.Tensor, rows: list[int]) -> torch.Tensor:
    marks = torch.zeros_like(ids)
    marks[:, rows] = 1
    return graph(ids, marks)[0]


def test_gemma2_head_is_found_behind_the_soft_cap(gemma2):
    for graph in tokenpass.capture(gemma2).values():
        head = graph.sites().lm_head
        assert head is not None and head.weight == "p_model_lm_head_weight"
        assert head.norm_module == "model.norm" and head.norm_kind == "rms_norm"
        assert [graph.node(name).target for name in head.post_ops] == SOFTCAP_TARGETS
        assert graph.node(head.post_ops[0]).args[0].name == head.node


def test_select_logit_rows_on_gemma2_keeps_the_soft_cap_exact(gemma2):
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    graph = _graph_of(_LogitsOnly(gemma2), ids, torch.ones_like(ids))
    full = graph(ids, torch.ones_like(ids))[0]
    result = SelectLogitRows()(graph)
    assert result.modified and result.counts["rowwise_ops_after_head"] == 3
    rows = [1, 4, 6]
    picked = _select(graph, ids, rows)
    assert picked.shape == (2, 3, 320)
    torch.testing.assert_close(picked, full[:, rows], rtol=0, atol=1e-6)
    assert picked.abs().max() <= 30.0  # still soft-capped


class _CappedHead(nn.Module):
    """Norm, head, soft-cap and a cast; ``leak`` also returns the uncapped logits."""

    def __init__(self, leak: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.norm, self.head = nn.Embedding(50, 8), nn.LayerNorm(8), nn.Linear(8, 50, bias=False)
        self.leak = leak

    def forward(self, input_ids, attention_mask):
        raw = self.head(self.norm(self.embed(input_ids)))
        logits = (torch.tanh(raw / 5.0) * 5.0).to(torch.float64)
        return (logits, raw) if self.leak else (logits,)


def test_select_logit_rows_before_a_capped_and_cast_head():
    ids = torch.randint(0, 50, (2, 5))
    graph = _graph_of(_CappedHead(), ids, torch.ones_like(ids))
    head = graph.sites().lm_head
    assert head is not None and head.norm_kind == "layer_norm"
    assert [graph.node(n).target for n in head.post_ops][:3] == SOFTCAP_TARGETS and len(head.post_ops) == 4
    full = graph(ids, torch.ones_like(ids))[0]
    SelectLogitRows()(graph)
    picked = _select(graph, ids, [0, 3])
    assert picked.dtype == torch.float64
    torch.testing.assert_close(picked, full[:, [0, 3]], rtol=0, atol=0)


def test_head_whose_raw_logits_are_used_elsewhere_is_not_seen_through():
    ids = torch.randint(0, 50, (2, 5))
    graph = _graph_of(_CappedHead(leak=True), ids, torch.ones_like(ids))
    assert find_lm_head(graph.graph) is None
    result = SelectLogitRows()(graph)
    assert not result.applicable and "row-wise elementwise" in result.misses[0].reason
