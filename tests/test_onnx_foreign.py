"""Passes on ONNX decoders exported by someone else (``tools/plain_onnx_export.py``: plain
``torch.onnx.export`` of a Hugging Face model, its cache as inputs and outputs, no tokenpass).

Opset 18 spells attention MatMul/Softmax/MatMul over GQA-repeated keys; opset 23 spells it as
``Attention`` nodes. Both canonicalise to ``tokenpass.Attention`` calls, and TidalDecode and TokenSelect
rewrite those into their own functions: the ONNX runtime then generates the tokens the torch path of
each method does.
"""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

import tokenpass
from plain_onnx_export import plain_export
from tokenpass.cli import app
from tokenpass.errors import CaptureError, PassError
from tokenpass.ir.foreign.canonicalize import canonicalize
from tokenpass.ir.foreign.interface import normalize_interface
from tokenpass.ir.foreign.sites import find_attention_sites
from tokenpass.methods.tidaldecode.onnx_graph import rewrite_onnx
from tokenpass.onnx_export import ExportError, token_ids
from tokenpass.passes.onnx_rewrites import OnnxContext
from tokenpass.runtime.onnx_check import check_same_outputs, one_query_mask_misses, session_of
from tokenpass.runtime.onnx_session import MANIFEST, OnnxModel

from conftest import genai_generate, hf_tiny, padded_batch

NEW_TOKENS = 64


def sparse() -> tokenpass.TidalDecode:
    """Layer 1 selects 4 slots per KV head, layers 2-3 read them; layer 0 stays dense."""
    return tokenpass.TidalDecode(top_k=4, sparse_start=1, selection_layers=[1])


@pytest.fixture(scope="module")
def model():
    return hf_tiny("llama")


@pytest.fixture(scope="module")
def plain_files(model, tmp_path_factory):
    """Plain exports by opset, made once per module."""
    made = {}

    def plain(opset: int):
        if opset not in made:
            made[opset] = plain_export(model, tmp_path_factory.mktemp("plain") / "plain.onnx", opset=opset)
        return made[opset]

    return plain


@pytest.fixture(scope="module")
def torch_tokens(model):
    """The torch runtime's tokens for the left-padded batch, per pass list (captured once each)."""
    ids, mask = padded_batch(model.config.vocab_size, batch=2, length=12, pad=5)
    made = {}

    def tokens(name: str, passes: list):
        if name not in made:
            made[name] = tokenpass.optimize(model, passes).generate(ids, mask, max_new_tokens=NEW_TOKENS)
        return made[name]

    return ids, mask, tokens


@pytest.fixture(scope="module")
def plain(plain_files):
    return plain_files(18)


@pytest.fixture(scope="module", params=[18, 23], ids=["opset18-matmul-softmax", "opset23-attention"])
def foreign(request, model, plain_files, tmp_path_factory):
    """A plain export and tokenpass's TidalDecode rewrite of it."""
    source = plain_files(request.param)
    out = tokenpass.optimize_onnx(source, tmp_path_factory.mktemp("tidal") / "tidal", [sparse()],
                                  token_ids=token_ids(model))
    return source, out, request.param


def test_tidaldecode_on_a_plain_export_generates_the_torch_paths_tokens(foreign, torch_tokens):
    _, out, _ = foreign
    ids, mask, tokens = torch_tokens
    expected = tokens("tidaldecode", [sparse()])
    assert torch.equal(OnnxModel(out.directory).generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)
    assert not torch.equal(expected, tokens("dense", []))  # the method is visibly on: a dense file would fail


def test_tokenselect_on_a_plain_export_generates_the_torch_paths_tokens(plain, torch_tokens, tmp_path):
    select = tokenpass.TokenSelect(top_k=4, n_init=2, n_local=3, theta=None)
    out = tokenpass.optimize_onnx(plain, tmp_path / "select", [select])
    assert out.passes == ["canonicalize_attention", "tokenselect"]
    ids, mask, tokens = torch_tokens
    expected = tokens("tokenselect", [select])
    assert torch.equal(OnnxModel(out.directory).generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)
    assert not torch.equal(expected, tokens("dense", []))
    changes = json.loads((out.directory / MANIFEST).read_text())["changes"]["decode"]
    assert changes["tokenselect"] == {"selecting_layers": 4}
    with pytest.raises(PassError, match="tokenselect cannot rewrite plain.onnx's decode step: theta=0.9 reuses"):
        tokenpass.optimize_onnx(plain, tmp_path / "cached", [tokenpass.TokenSelect(top_k=4)])


def test_onnxruntime_genai_runs_the_rewritten_file(model, foreign):
    _, out, opset = foreign
    if opset != 18:
        pytest.skip("one opset is enough for onnxruntime-genai: the rewritten files differ only in spelling")
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    expected = tokenpass.optimize(model, [sparse()]).generate(ids, max_new_tokens=NEW_TOKENS)
    assert torch.equal(genai_generate(out.directory, ids, NEW_TOKENS), expected)


def test_the_rewrite_is_recorded_counted_and_inspectable(foreign):
    _, out, opset = foreign
    changes = json.loads((out.directory / MANIFEST).read_text())["changes"]
    spelling = "matmul_softmax_sites" if opset == 18 else "onnx_attention_sites"
    assert changes["prefill"] == {"canonicalize_attention": {spelling: 4}}  # TidalDecode is decode-only
    assert changes["decode"]["tidaldecode"] == {"dense_layers": 1, "selection_layers": 1, "sparse_layers": 2}
    decode = onnx.load(str(out.directory / "decode.onnx"))
    calls = [n.op_type for n in decode.graph.node if n.domain == "tokenpass"]
    assert calls == ["Attention", "SelectionAttention", "SparseAttention", "SparseAttention"]
    bodies = {n.domain for f in decode.functions for n in f.node}
    assert bodies == {""}  # the functions' bodies are standard ops: stock onnxruntime runs them
    assert not [n for n in decode.graph.node if n.op_type in ("Softmax", "Attention") and n.domain == ""]
    shown = CliRunner().invoke(app, ["inspect", str(out.directory / "decode.onnx")])
    assert shown.exit_code == 0, shown.output
    assert "tidaldecode changed: dense_layers 1, selection_layers 1, sparse_layers 2" in shown.output
    assert "tokenpass.SparseAttention: layers 2-3" in shown.output
    assert "function tokenpass.SparseAttention" in shown.output and "calls 2" in shown.output


def test_without_passes_the_canonical_file_generates_dense_tokens_and_applying_twice_changes_nothing(
        foreign, torch_tokens, tmp_path):
    plain, out, _ = foreign
    dense = tokenpass.optimize_onnx(plain, tmp_path / "dense")
    ids, mask, tokens = torch_tokens
    generated = OnnxModel(dense.directory).generate(ids, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(generated, tokens("dense", []))
    decode = ir.load(out.directory / "decode.onnx")
    before = len(list(decode.graph))
    sites = [s for s in find_attention_sites(decode.graph)[0] if s.spelling == "tokenpass"]
    again = rewrite_onnx(sparse(), decode, sites, OnnxContext(OnnxModel(out.directory).spec, 18))
    assert again.counts == {"already_applied": 1} and not again.modified and len(list(decode.graph)) == before


def test_the_cli_rewrites_a_file_and_refuses_to_overwrite(plain, tmp_path):
    args = ["export", str(plain), "-p", "tidaldecode:top_k=4", "-o", str(tmp_path / "cli")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0 and "canonicalize_attention, tidaldecode" in first.output, first.output
    second = CliRunner().invoke(app, args)
    assert second.exit_code != 0 and "exists; pass force=True (--force)" in second.output


def test_canonicalisation_that_changes_the_output_is_refused(plain):
    """The spelling read off the graph is run against the file: a wrong constant (here a doubled scale,
    standing in for a pattern misread) is refused before anything is written."""
    model = ir.load(plain)
    sites, _ = find_attention_sites(model.graph)
    sites[2].scale *= 2
    canonical = canonicalize(model, sites, 18)
    spec, interface = normalize_interface(model, canonical, "plain")
    with pytest.raises(CaptureError, match="changed output 'logits'"):
        check_same_outputs(session_of(plain), session_of(model), spec, "canonicalising attention", interface.renamed)


def test_a_mask_that_is_not_causal_plus_padding_is_refused_by_tidaldecode(plain):
    """Layer 0's mask inverted (padding visible): TidalDecode reads slot liveness off the mask, so the
    check names the layer and the rewrite refuses the whole step, leaving it unchanged."""
    model = ir.load(plain)
    sites = canonicalize(model, find_attention_sites(model.graph)[0], 18)
    spec, _ = normalize_interface(model, sites, "plain")
    mask = sites[0].mask
    flipped = ir.Node("", "Not" if mask.dtype == ir.DataType.BOOL else "Neg", [mask], num_outputs=1)
    flipped.outputs[0].name, flipped.outputs[0].type = "flipped_mask", mask.type
    model.graph.insert_before(sites[0].node, flipped)
    sites[0].node.replace_input_with(3, flipped.outputs[0])
    sites = find_attention_sites(model.graph)[0]
    misses = one_query_mask_misses(model, sites, spec)
    assert misses == ["layer 0: its mask on a one-token step is not causal + padding"]
    before = len(list(model.graph))
    result = rewrite_onnx(sparse(), model, sites, OnnxContext(spec, 18, misses))
    assert result.misses[0].startswith("layer 0") and not result.modified and len(list(model.graph)) == before
    late = tokenpass.TidalDecode(top_k=4, sparse_start=1, selection_layers=[2])  # layer 1 would read nothing
    refused = rewrite_onnx(late, model, sites, OnnxContext(spec, 18, []))
    assert "sparse_start=1 must be a selection layer" in refused.misses[0] and len(list(model.graph)) == before


def test_a_sliding_window_cache_is_not_taken_for_attention_over_the_whole_past(tmp_path):
    """Mistral with a 2-token window: HF's cache keeps only the window, so the keys are not cat(past,
    new) and nothing is rewritten, with the reason."""
    plain = plain_export(hf_tiny("mistral", sliding_window=2, num_hidden_layers=2), tmp_path / "mistral.onnx")
    with pytest.raises(CaptureError, match=r"no recognisable attention .* a cache that drops tokens"):
        tokenpass.optimize_onnx(plain, tmp_path / "out", [sparse()])
    assert not (tmp_path / "out").exists()


def _softmax_classifier(opset: int):
    """A graph with a MatMul -> Softmax but no attention (a classifier head)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.ones(12, dtype=np.float32))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["s"]), helper.make_node("Softmax", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "classifier", [x], [y], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _contrib_attention():
    """A graph whose attention is onnxruntime's fused GroupQueryAttention (as onnxruntime-genai builds)."""
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 64])
    node = helper.make_node("GroupQueryAttention", ["q", "", "", "", "", "", ""], ["y"], domain="com.microsoft",
                            num_heads=4, kv_num_heads=2)
    graph = helper.make_graph([node], "gqa", [q], [y])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated", "no-attention", "opset-13", "no-rewrite",
                                  "contrib-gqa"])
def test_bad_input_is_one_clear_error(case, tmp_path, plain):
    path = tmp_path / "bad.onnx"
    passes, error, message = [], CaptureError, ""
    if case == "corrupt":
        path.write_bytes(b"\x08\x07 not a protobuf" * 40)
        message = "is not a valid ONNX model"
    elif case == "truncated":
        path.write_bytes(plain.read_bytes()[:20_000])
        message = "is not a valid ONNX model"
    elif case == "no-attention":
        onnx.save(_softmax_classifier(18), path)
        message = "no recognisable attention .* node 'Softmax': the keys are not cat\\(past input, new\\)"
    elif case == "opset-13":
        onnx.save(_softmax_classifier(13), path)
        message = "uses ONNX opset 13; tokenpass rewrites opsets 18-23"
    elif case == "contrib-gqa":
        onnx.save(_contrib_attention(), path)
        message = "com.microsoft GroupQueryAttention with no past_key graph input"
    elif case == "no-rewrite":
        path, passes, error = plain, [tokenpass.Keyformer()], PassError
        message = "pass 'keyformer' has no rewrite for ONNX graphs yet .*: tidaldecode, tokenselect"
    else:
        message = "no such file"
    with pytest.raises(error, match=message):
        tokenpass.optimize_onnx(path, tmp_path / "out", passes)
    assert not (tmp_path / "out").exists()


def test_an_existing_directory_is_not_replaced_without_force(foreign):
    plain, out, _ = foreign
    with pytest.raises(ExportError, match="exists; pass force=True"):
        tokenpass.optimize_onnx(plain, out.directory, [sparse()])
