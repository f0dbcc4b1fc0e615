"""Method passes in ONNX exports: the ONNX runtime decodes what the torch runtime decodes with the method.

TidalDecode and TokenSelect (``theta=None``) export on the explicit cache (their explicit-cache ops,
translated into standard ONNX ops): their state between steps is the standard past/present cache, so
the export runs under stock onnxruntime and onnxruntime-genai with no extra inputs.
"""

import onnx
import pytest
import torch
from typer.testing import CliRunner

import tokenpass
from tokenpass.cli import app
from tokenpass.ir.requests import PolicySpec
from tokenpass.onnx_export import ExportError, check_exportable, export_onnx
from tokenpass.runtime.onnx_session import OnnxModel

from conftest import genai_generate, padded_batch, teacher_forced

NEW_TOKENS = 64
PROMPT, FORCED = 16, 12  # teacher-forced decode steps past a prompt longer than what the methods read


def sparse() -> tokenpass.TidalDecode:
    """Layer 1 selects 4 slots per KV head (ranking with a quarter of the channels), layers 2-3 read them."""
    return tokenpass.TidalDecode(top_k=4, sparse_start=1, selection_layers=[1])


def select() -> tokenpass.TokenSelect:
    """Every layer reads the first 2, the last 3 and 4 soft-voted tokens; no selection cache."""
    return tokenpass.TokenSelect(top_k=4, n_init=2, n_local=3, theta=None)


METHODS = {"tidaldecode": sparse, "tokenselect": select}
FUNCTIONS = {"tidaldecode": {"Attention", "SelectionAttention", "SparseAttention"},
             "tokenselect": {"TokenSelectAttention"}}
CHANGES = {"tidaldecode": "dense_layers 1, selection_layers 1, sparse_layers 2, explicit_cache 1",
           "tokenselect": "selecting_layers 4, explicit_cache 1"}
# RoPE + GQA, and soft-capped GQA with an additive mask (gpt2's MHA and learnt positions export in
# tests/test_onnx_export.py; TokenSelect shares the mask and slot-attention translation with TidalDecode,
# so one family covers its own arithmetic). The suite's time budget keeps this matrix small.
CASES = [("tidaldecode", "llama"), ("tidaldecode", "gemma"), ("tokenselect", "llama")]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(case) for case in CASES])
def exported(request, tmp_path_factory):
    method, family = request.param
    model = tokenpass.tiny(family).eval()
    directory = tmp_path_factory.mktemp("onnx") / f"{method}-{family}"
    return model, method, export_onnx(model, directory, passes=[METHODS[method]()])


def test_the_onnx_runtime_generates_the_torch_runtimes_tokens_for_a_left_padded_batch(exported):
    model, name, result = exported
    ids, mask = padded_batch(model.config.vocab_size, batch=2, length=12, pad=5)
    expected = tokenpass.optimize(model, [METHODS[name]()]).generate(ids, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(OnnxModel(result.directory).generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)


def test_onnx_decode_logits_match_the_torch_runtime_and_differ_from_dense(exported):
    """Within 1e-3 of the torch runtime's decode with the method, while that is visibly not dense (so the
    comparison would catch an export that dropped the method)."""
    model, name, result = exported
    ids, mask = padded_batch(model.config.vocab_size, batch=2, length=PROMPT + FORCED, pad=3)
    got, _ = teacher_forced(OnnxModel(result.directory), ids, mask, PROMPT)
    expected, _ = teacher_forced(tokenpass.optimize(model, [METHODS[name]()]), ids, mask, PROMPT)
    dense, _ = teacher_forced(tokenpass.optimize(model, []), ids, mask, PROMPT)
    assert (got - expected).abs().max() < 1e-3
    assert (expected - dense).abs().max() > 1e-2


def test_onnxruntime_genai_generates_the_torch_runtimes_tokens(exported):
    """onnxruntime-genai's own generator, reading the export's genai_config.json (prefill on the prompt,
    the method's decode step on each new token), generates the torch runtime's tokens."""
    model, name, result = exported
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    expected = tokenpass.optimize(model, [METHODS[name]()]).generate(ids, max_new_tokens=NEW_TOKENS)
    assert torch.equal(genai_generate(result.directory, ids, NEW_TOKENS), expected)


def test_the_export_has_tokenpass_functions_of_standard_ops_and_records_what_the_pass_changed(exported):
    _, method, result = exported
    assert result.passes == ["canonicalize_attention", method]  # canonicalisation added for the method
    decode, prefill = (onnx.load(str(result.files[phase])) for phase in ("decode", "prefill"))
    calls = {node.op_type for node in decode.graph.node if node.domain == "tokenpass"}
    assert calls == FUNCTIONS[method]  # each op outlined into a function (and canonical attention, if left)
    assert {n.domain for f in decode.functions for n in f.node} == {""}  # bodies of standard ops only
    assert {"TopK", "GatherElements"} <= {n.op_type for f in decode.functions for n in f.node}
    assert "TopK" not in {n.op_type for f in prefill.functions for n in f.node}
    assert {n.op_type for n in prefill.graph.node if n.domain == "tokenpass"} == {"Attention"}
    out = CliRunner().invoke(app, ["inspect", str(result.files["decode"])])
    assert out.exit_code == 0, out.output
    assert f"{method} changed: {CHANGES[method]}" in out.output


def test_the_papers_configuration_exports_from_an_optimized_model(tmp_path):
    """Per-query-head selection and dense selection layers (the translation's other branches), exported
    from an ``OptimizedModel`` made without lowering: the export records the passes its graphs went
    through (reading their names used to fail) and generates what that model generates."""
    model = tokenpass.tiny("llama").eval()
    paper = tokenpass.TidalDecode(top_k=4, sparse_start=1, selection_layers=[1], per_kv_head=False,
                                  sparse_selection_output=False)
    optimized = tokenpass.optimize(model, ["canonicalize_attention", paper], lower=False)
    ids, mask = padded_batch(model.config.vocab_size, batch=2, length=12, pad=5)
    expected = optimized.generate(ids, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(expected, tokenpass.optimize(model, [paper]).generate(ids, mask, max_new_tokens=NEW_TOKENS))
    assert not torch.equal(expected, tokenpass.optimize(model, []).generate(ids, mask, max_new_tokens=NEW_TOKENS))
    export = export_onnx(optimized, tmp_path / "paper")
    assert export.passes == ["canonicalize_attention", "tidaldecode"]
    assert torch.equal(OnnxModel(export.directory).generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)


def test_options_needing_the_runtime_are_refused_in_one_line(tmp_path):
    """TidalDecode's ranking copy and TokenSelect's selection cache live in the runtime's cache (cache
    correction's refusal is the explicit form's, tests/test_tidaldecode.py)."""
    model = tokenpass.tiny("llama")
    with pytest.raises(ExportError, match=r"score_dtype=\.\.\.\) has no ONNX form yet") as info:
        export_onnx(model, tmp_path / "b", passes=[tokenpass.TidalDecode(top_k=4, score_dtype="bfloat16")])
    assert "\n" not in str(info.value)
    with pytest.raises(tokenpass.PassError, match="theta=0.9 reuses selections kept in the runtime's cache") as info:
        export_onnx(model, tmp_path / "c", passes=[tokenpass.TokenSelect()])
    assert "\n" not in str(info.value)
    assert not any((tmp_path / name).exists() for name in "bc")


def test_a_graph_asking_the_runtime_for_a_policy_or_cache_state_is_refused_naming_it():
    graph = tokenpass.optimize(tokenpass.tiny("llama"), [], lower=False).step_graphs["decode"]
    graph.add_policy(PolicySpec.of("tidaldecode.cache_correction", interval=4))
    with pytest.raises(ExportError, match="needs the runtime's run-time policy 'tidaldecode.cache_correction'"):
        check_exportable(graph)
