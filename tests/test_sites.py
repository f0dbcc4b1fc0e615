import pytest

import tokenpass
from tokenpass.models import TINY_FAMILIES

from conftest import hf_tiny


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_exposes_layers_attention_cache_and_head(family):
    graph = tokenpass.capture(tokenpass.tiny(family), phases=("decode",))["decode"]
    sites = graph.sites()
    assert [s.layer for s in sites.attention] == [0, 1, 2, 3]
    assert [layer.index for layer in sites.layers] == [0, 1, 2, 3]
    for site in sites.attention:
        assert site.key_cache.past == f"past_keys_{site.layer}"
        assert site.value_cache.past == f"past_values_{site.layer}"
        assert site.key_cache.present and site.value_cache.present
        assert site.head_dim == 16 and site.scale == pytest.approx(0.25)
    assert sites.lm_head is not None and sites.lm_head.norm_kind in ("rms_norm", "layer_norm")
    flow = graph.to_networkx()
    assert flow.number_of_nodes() == len(graph.graph.nodes)
    assert all(flow.has_edge(site.query, site.node) for site in sites.attention)


def test_gqa_heads_are_read_through_the_head_repeat():
    sites = tokenpass.capture(tokenpass.tiny("llama"), phases=("decode",))["decode"].sites()
    assert {(s.num_heads, s.num_kv_heads) for s in sites.attention} == {(4, 2)}
    assert all(s.key == s.key_cache.present for s in sites.attention)


@pytest.mark.smollm2
def test_smollm2_sites(smollm2_optimized):
    for graph in smollm2_optimized.graphs.values():
        sites = graph.sites()
        assert len(sites.attention) == 30 and len(sites.layers) == 30
        assert {(s.num_heads, s.num_kv_heads, s.head_dim) for s in sites.attention} == {(9, 3, 64)}
        assert sites.lm_head.norm_module == "model.norm" and sites.lm_head.norm_kind == "rms_norm"
        assert sites.layers[7].module == "model.layers.7"


def test_key_rotary_reads_frequencies_and_rotated_dims_from_the_graph():
    """Partial rotary (phi3 with half the dims rotated) is found from the graph; learned absolute
    positions (gpt2) are reported as no rotary, naming the keys."""
    from tokenpass.ir.rotary import Rotary, key_rotary

    for model, want in ((hf_tiny("phi3", partial_rotary_factor=0.5), Rotary("b_model_model_rotary_emb_inv_freq", 8)),
                        (tokenpass.tiny("gpt2"), "is not the sum x * cos + rotate_half(x) * sin")):
        graph = tokenpass.optimize(model, passes=[], phases=["decode"]).graphs["decode"]
        found = key_rotary(graph.node(graph.sites().attention[0].key))
        assert found == want if isinstance(want, Rotary) else want in found
