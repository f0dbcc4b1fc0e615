from typing import ClassVar

import pytest
import torch

import tokenpass
from tokenpass.errors import PassError, PassOrderError
from tokenpass.ir.capture import sample_inputs
from tokenpass.ir.ops import attention_op
from tokenpass.ir.sites import SDPA
from tokenpass.passes import Pass, PassManager, PassResult, make_pass
from tokenpass.passes.canonicalize_attention import CanonicalizeAttention


def _decode_graph(family="llama", **model_kwargs):
    model = tokenpass.tiny(family)
    return tokenpass.capture(model, phases=("decode",))["decode"]


def _count(graph, target):
    return sum(1 for n in graph.graph.nodes if n.target == target)


def _outputs(graph):
    return torch.utils._pytree.tree_leaves(graph(*sample_inputs(graph.spec, graph.phase)))


def test_canonicalize_rewrites_every_site_exactly():
    graph = _decode_graph()
    before = _outputs(graph)
    (result,) = PassManager(["canonicalize_attention"]).run(graph)
    assert result.modified and result.counts["sdpa_to_tokenpass_attention"] == 4
    assert result.counts["gqa_head_repeat_folded"] == 4
    assert _count(graph, SDPA) == 0 and _count(graph, attention_op) == 4
    assert len(result.replaced) == 4 and len(result.added) == 4 and not result.misses
    assert "attention_canonical" in graph.properties
    for a, b in zip(before, _outputs(graph)):
        assert torch.equal(a, b)
    new = graph.node(next(iter(result.replaced.values())))
    assert new.meta["tokenpass"]["pass"] == "canonicalize_attention"  # provenance


def test_dce_removes_the_head_repeat_left_dead():
    graph = _decode_graph()
    canon, dce = PassManager(["canonicalize_attention", "dce"], verify=True).run(graph)
    # Per layer, keys and values each lose slice -> unsqueeze -> slice -> expand -> reshape.
    assert dce.counts["nodes_removed"] >= 4 * 2 * 3
    assert not any(n.target == torch.ops.aten.expand.default and "cat" in str(n.args[0]) for n in graph.graph.nodes)


def test_passes_are_idempotent():
    graph = _decode_graph("qwen2")
    PassManager(["canonicalize_attention", "dce"]).run(graph)
    version = graph.version
    again = PassManager(["canonicalize_attention", "dce"]).run(graph)
    assert [r.modified for r in again] == [False, False]
    assert again[0].counts["already_canonical"] == 4
    assert graph.version == version


def test_canonicalize_reports_a_miss_with_site_and_check():
    graph = _decode_graph()
    node = graph.node(graph.sites().attention[1].node)
    node.kwargs = {**node.kwargs, "dropout_p": 0.1}
    graph.mark_changed()
    (result,) = PassManager(["canonicalize_attention"]).run(graph)
    assert result.counts["sdpa_to_tokenpass_attention"] == 3
    (miss,) = result.misses
    assert miss.site.startswith("layer 1 attention") and miss.check == "dropout_p == 0" and "eval mode" in miss.reason


class _NeedsCanonical(Pass):
    name = "needs_canonical"
    exact = True
    requires: ClassVar = frozenset({"attention_canonical"})

    def run(self, graph):
        return PassResult(self.name, graph)


class _Breaks(Pass):
    name = "breaks"
    exact = True

    def run(self, graph):
        raise RuntimeError("boom")


class _Corrupts(Pass):
    name = "corrupts"
    exact = True

    def run(self, graph):
        for node in graph.graph.nodes:
            if node.target == torch.ops.aten.linear.default:
                node.args = (node.args[0], node.args[1])
                node.target = torch.ops.aten.linear.default
                with graph.graph.inserting_after(node):
                    neg = graph.graph.call_function(torch.ops.aten.neg.default, (node,))
                node.replace_all_uses_with(neg, delete_user_cb=lambda user: user is not neg)
                break
        return PassResult(self.name, graph, modified=True)


def test_bad_order_is_rejected_before_anything_runs():
    graph = _decode_graph()
    with pytest.raises(PassOrderError, match="'needs_canonical' requires attention_canonical.*canonicalize_attention"):
        PassManager([_NeedsCanonical(), "canonicalize_attention"]).run(graph)
    assert graph.version == 0
    PassManager(["canonicalize_attention", _NeedsCanonical()]).run(graph)


def test_failure_names_the_pass_and_those_before_it():
    graph = _decode_graph()
    with pytest.raises(PassError, match=r"pass 'breaks' failed on llama/decode \(after canonicalize_attention, dce\): RuntimeError: boom"):
        PassManager(["canonicalize_attention", "dce", _Breaks()]).run(graph)


def test_verify_catches_an_exact_pass_that_changes_numerics():
    graph = _decode_graph()
    with pytest.raises(PassError, match="exact pass 'corrupts' changed output 0 of llama/decode"):
        PassManager([_Corrupts()], verify=True).run(graph)


def test_unknown_pass_name_lists_choices():
    with pytest.raises(PassError, match="unknown pass 'fast'.*canonicalize_attention, cutcrossentropy, dce"):
        make_pass("fast")
    assert isinstance(make_pass("canonicalize_attention"), CanonicalizeAttention)
