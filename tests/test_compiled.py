"""Compiled steps (``tokenpass/runtime/compiled.py``) give the eager runtime's greedy tokens, dense and sparse.

Inductor's C++ build is slow on a small CPU, so each model compiles once per module (fixtures) and the
tests read the same compiled models: a batch of 2 compiles the prefill bucket (any batch and length)
and the batch-2 decode bucket; a batch of 1 adds only its decode bucket.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import tokenpass
from tokenpass.cli import app
from tokenpass.runtime.model import OptimizedModel
from tokenpass.runtime.compiled import Bucket, inductor_options, uses_cudagraphs
from conftest import padded_batch

NEW_TOKENS = 16
SPARSE = "tidaldecode:top_k=4:sparse_start=1:selection_layers=1"  # top_k 4 of 12+ past slots: the sparse path


@pytest.fixture(scope="module")
def llama():
    return tokenpass.tiny("llama")


@pytest.fixture(scope="module")
def prompts():
    return padded_batch(320, batch=2, length=12, pad=4)  # row 0 left-padded by 4 tokens


@pytest.fixture(scope="module")
def dense(llama, prompts):
    """The eager model, its compiled twin, and both greedy outputs on the padded batch of 2."""
    eager = tokenpass.optimize(llama)
    compiled = eager.compiled()
    ids, mask = prompts
    return eager, compiled, eager.generate(ids, mask, max_new_tokens=NEW_TOKENS), \
        compiled.generate(ids, mask, max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def sparse(llama, prompts):
    eager = tokenpass.optimize(llama, passes=[SPARSE])
    compiled = tokenpass.optimize(llama, passes=[SPARSE], compile=True)
    ids, mask = prompts
    return eager, compiled, eager.generate(ids, mask, max_new_tokens=NEW_TOKENS), \
        compiled.generate(ids, mask, max_new_tokens=NEW_TOKENS)


def test_compiled_dense_gives_the_eager_greedy_tokens(dense):
    _, compiled, eager_tokens, compiled_tokens = dense
    assert compiled.compile_report is not None
    assert torch.equal(compiled_tokens, eager_tokens)


def test_compiled_prefill_logits_match_eager(dense, prompts):
    eager, compiled, _, _ = dense
    ids, mask = prompts
    torch.testing.assert_close(compiled(ids, mask), eager(ids, mask), atol=1e-4, rtol=1e-4)


def test_compiled_tidaldecode_sparse_path_gives_its_eager_tokens(sparse):
    eager, compiled, eager_tokens, compiled_tokens = sparse
    assert torch.equal(compiled_tokens, eager_tokens)
    # the sparse op really ran compiled: its decode graph holds it, and the decode bucket compiled whole
    assert "tokenpass.sparse_attention" in {site.op for site in compiled.graphs["decode"].sites().attention}
    decode = [e for e in compiled.compile_report.entries if e.bucket.phase == "decode"]
    assert [e.graphs for e in decode] == [1]


def test_each_bucket_compiles_once_whole_and_reports_its_first_call(dense):
    _, compiled, _, _ = dense
    report = compiled.compile_report
    assert {e.bucket for e in report.entries} >= {Bucket("prefill", None, "cpu"), Bucket("decode", 2, "cpu")}
    for entry in report.entries:
        assert entry.graphs == 1  # fullgraph: the custom ops stay opaque, no graph break
        assert entry.first_call_s > 0 and entry.inductor_s <= entry.first_call_s
        assert not entry.cudagraphs
    figures = report.to_dict()
    assert figures["compile_s"] == pytest.approx(report.seconds()) and figures["compile_s"] > 0
    assert len(report.lines()) >= 2


def test_a_second_generate_with_the_same_batch_does_not_recompile(dense, prompts):
    eager, compiled, eager_tokens, _ = dense
    before = compiled.compile_report.compilations
    ids, mask = prompts
    again = compiled.generate(ids, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(again, eager_tokens)
    assert compiled.compile_report.compilations == before
    assert compiled.compile_report.recompiles == 0


def test_a_new_batch_size_adds_one_decode_bucket(dense, prompts):
    """Prefill is compiled for any batch and length (a prompt sliced from the batch included); decode per
    batch size."""
    eager, compiled, _, _ = dense
    ids, mask = prompts
    report = compiled.compile_report
    before, buckets = report.compilations, {e.bucket for e in report.entries}
    one = compiled.generate(ids[1:, 3:], mask[1:, 3:], max_new_tokens=4)
    assert torch.equal(one, eager.generate(ids[1:, 3:], mask[1:, 3:], max_new_tokens=4))
    assert {e.bucket for e in report.entries} - buckets == {Bucket("decode", 1, "cpu")}
    assert report.compilations == before + 1 and report.recompiles == 0


def test_cuda_graphs_only_for_static_steps_on_cuda():
    """The CUDA path (untested without a GPU) splits the graph around every op that reads the runtime
    cache; the CPU path never takes it."""
    assert inductor_options(Bucket("decode", 2, "cpu")) == {} and not uses_cudagraphs(Bucket("decode", 2, "cpu"))
    assert inductor_options(Bucket("prefill", None, "cuda")) == {}
    options = inductor_options(Bucket("decode", 2, "cuda"))
    assert options["triton.cudagraphs"] and options["graph_partition"]
    assert {"tokenpass::cached_attention", "tokenpass::sparse_attention",
            "tokenpass::selection_attention"} <= set(options["custom_should_partition_ops"])


def test_models_not_lowered_refuse_to_compile(llama):
    graph = tokenpass.capture(llama, phases=("decode",))["decode"]  # as captured: explicit cache tensors
    with pytest.raises(tokenpass.TokenpassError, match="lowered onto the runtime KV cache"):
        OptimizedModel(graph.spec, {"decode": graph}).compiled()


def test_bench_compile_reports_compile_seconds(dense):
    """``tokenpass bench --compile``: the baseline alone, compiled (the graphs of ``dense``: Inductor's
    cache serves them), with its compile seconds in the JSON."""
    result = CliRunner().invoke(app, ["bench", "llama", "--context", "16", "--continuation", "4", "--greedy", "2",
                                      "--json", "--compile"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["compiled"] is True
    (base,) = report["configs"]
    assert base["compile_s"] > 0 and base["ppl_ratio"] == pytest.approx(1.0)


def test_cpp_wrapper_decode_gives_the_eager_tokens(dense, prompts):
    """Inductor's C++ wrapper (kernels called from C++, prefill and decode) still calls the runtime's
    cache ops at run time: the same tokens as eager."""
    eager, _, eager_tokens, _ = dense
    ids, mask = prompts
    compiled = eager.compiled(cpp_wrapper=True)
    assert torch.equal(compiled.generate(ids, mask, max_new_tokens=NEW_TOKENS), eager_tokens)
    assert inductor_options(Bucket("decode", 2, "cpu"), cpp_wrapper=True) == {"cpp_wrapper": True}
    assert compiled.compile_report.recompiles == 0
