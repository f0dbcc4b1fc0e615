"""ONNX export: the steps as files stock onnxruntime runs, generating what the torch runtime generates."""

import json

import onnx
import pytest
import torch
from typer.testing import CliRunner

import tokenpass
from tests.conftest import genai_generate, padded_batch
from tokenpass.bench import bench
from tokenpass.cli import app
from tokenpass.errors import CaptureError
from tokenpass.ir.onnx_bridge import summarize_onnx
from tokenpass.ir.onnx_translations import attention_onnx
from tokenpass.kernels.attention_ref import attention_reference
from tokenpass.onnx_export import ExportError, check_exportable, export_onnx
from tokenpass.runtime.genai_config import GENAI_CONFIG
from tokenpass.runtime.onnx_session import MANIFEST, OnnxModel

EXPORTED_FAMILIES = ("llama", "gpt2", "gemma")  # RoPE + RMSNorm, learnt positions + LayerNorm, soft-capped GQA
NEW_TOKENS = 64
runner = CliRunner()


@pytest.fixture(scope="module", params=EXPORTED_FAMILIES)
def exported(request, tmp_path_factory):
    model = tokenpass.tiny(request.param).eval()
    directory = tmp_path_factory.mktemp("onnx") / request.param
    passes = ["canonicalize_attention", "dce"] if request.param == "llama" else []
    return model, export_onnx(model, directory, passes=passes), passes


def test_onnx_runtime_generates_the_torch_runtimes_tokens_for_a_left_padded_batch(exported):
    model, result, _ = exported
    ids, mask = padded_batch(model.config.vocab_size, batch=2, length=12, pad=5)
    torch_tokens = tokenpass.optimize(model, []).generate(ids, mask, max_new_tokens=NEW_TOKENS)
    onnx_tokens = OnnxModel(result.directory).generate(ids, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(onnx_tokens, torch_tokens)


def test_onnx_logits_match_the_torch_runtime_within_1e_3(exported):
    model, result, _ = exported
    ids, mask = padded_batch(model.config.vocab_size, batch=2, length=12, pad=5)
    expected = tokenpass.optimize(model, [])(ids, mask)
    got = OnnxModel(result.directory)(ids, mask)
    real = mask.bool()  # padded positions attend over nothing: undefined in both runtimes
    assert (got - expected).abs()[real].max() < 1e-3


def test_onnxruntime_genai_generates_the_torch_runtimes_tokens(exported):
    model, result, _ = exported
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    expected = tokenpass.optimize(model, []).generate(ids, max_new_tokens=NEW_TOKENS)
    assert torch.equal(genai_generate(result.directory, ids, NEW_TOKENS), expected)


def test_export_writes_checked_files_with_named_io_and_dynamic_axes(exported):
    model, result, passes = exported
    assert sorted(p.name for p in result.directory.iterdir()) == sorted(["decode.onnx", "prefill.onnx", MANIFEST,
                                                                        GENAI_CONFIG])
    assert result.passes == passes
    layers = model.config.num_hidden_layers
    for path in result.files.values():
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input}
        outputs = [v.name for v in proto.graph.output]
        assert outputs == ["logits", *[f"present_keys_{i}" for i in range(layers)],
                           *[f"present_values_{i}" for i in range(layers)]]
        assert inputs["input_ids"][0] == "batch" and inputs["past_keys_0"][2] == "past_tokens"
        assert inputs["attention_mask"] == ["batch", "total_tokens"]
        assert {n.domain for n in proto.graph.node} <= {"", "tokenpass"}
        assert {n.domain for f in proto.functions for n in f.node} <= {""}, "function bodies of standard ops"
        canonical = "canonicalize_attention" in passes
        own = [n for n in proto.graph.node if n.domain == "tokenpass"]
        assert [n.op_type for n in own] == (["Attention"] * layers if canonical else [])
        assert len(summarize_onnx(proto)["attention_sites"]) == layers  # the inspector finds every layer's


def test_export_never_overwrites_unless_forced(exported, tmp_path):
    model, result, _ = exported
    with pytest.raises(ExportError, match="exists; pass force=True"):
        export_onnx(model, result.directory)
    stranger = tmp_path / "notes"
    stranger.mkdir()
    with pytest.raises(ExportError, match="not a tokenpass ONNX export; refusing"):
        export_onnx(model, stranger, force=True)


def test_a_pass_on_the_runtime_cache_is_refused_naming_the_pass(tmp_path):
    with pytest.raises(ExportError, match="pass 'select_logit_rows' cannot export to ONNX yet: it works on the "
                                          "runtime's own KV cache") as info:
        export_onnx(tokenpass.tiny("llama"), tmp_path / "out", passes=["select_logit_rows"])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_graph_with_a_tokenpass_op_without_translation_is_refused_naming_the_node():
    lowered = tokenpass.optimize(tokenpass.tiny("llama"), [])
    with pytest.raises(ExportError, match=r"node 'cached_attention.*' \(tokenpass.cached_attention.default, made by "
                                          r"lower_kv_cache\) has no ONNX form yet"):
        check_exportable(lowered.step_graphs["decode"])


@pytest.mark.parametrize("masked", [False, True])
def test_the_attention_translation_with_is_causal_equals_the_reference(masked):
    """``is_causal`` (SDPA's top-left alignment), alone and with an additive padding mask, evaluated by
    onnxscript's eager evaluator against the torch reference (it masked every key while it built its
    triangle with ``ConstantOfShape``, whose default value is 0). Row 0's padded queries see no key."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, h, 5, 8, generator=generator) for h in (4, 2, 2))
    mask = torch.zeros(2, 1, 5, 5)
    mask[0, ..., :2] = torch.finfo(torch.float32).min
    mask = mask if masked else None
    got = attention_onnx(query.numpy(), key.numpy(), value.numpy(), None if mask is None else mask.numpy(), 0.35, True)
    expected = attention_reference(query, key, value, mask, 0.35, True)
    assert torch.allclose(torch.from_numpy(got.value)[1:] if masked else torch.from_numpy(got.value),
                          expected[1:] if masked else expected, atol=1e-5)


def test_a_pass_needing_the_runtime_cache_fails_in_one_line_naming_it(tmp_path):
    skipping = tokenpass.SkipDecode(min_layers=2, max_layers=4, warmup=1)
    with pytest.raises(tokenpass.TokenpassError, match="skipdecode") as info:
        export_onnx(tokenpass.tiny("llama"), tmp_path / "out", passes=[skipping])
    assert "\n" not in str(info.value)


def test_a_lowered_model_is_refused_with_the_way_out(tmp_path):
    with pytest.raises(ExportError, match="lower=False"):
        export_onnx(tokenpass.optimize(tokenpass.tiny("llama"), []), tmp_path / "out")


def test_broken_exports_are_one_line_errors(exported, tmp_path):
    _, result, _ = exported
    with pytest.raises(CaptureError, match="tokenpass_onnx.json is missing"):
        OnnxModel(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / MANIFEST).write_text((result.directory / MANIFEST).read_text())
    (broken / "prefill.onnx").write_bytes((result.directory / "prefill.onnx").read_bytes()[:1000])
    (broken / "decode.onnx").write_bytes((result.directory / "decode.onnx").read_bytes())
    with pytest.raises(CaptureError, match="onnxruntime cannot load .*prefill.onnx") as info:
        OnnxModel(broken)
    assert "\n" not in str(info.value)
    bf16 = json.loads((result.directory / MANIFEST).read_text())
    bf16["spec"]["dtype"] = "bfloat16"
    (broken / MANIFEST).write_text(json.dumps(bf16))
    with pytest.raises(tokenpass.TokenpassError, match="numpy arrays, which have no bfloat16"):
        OnnxModel(broken)
    (broken / MANIFEST).write_text('{"spec": {"name": "x"}}')
    with pytest.raises(CaptureError, match="tokenpass_onnx.json is not a valid tokenpass manifest"):
        OnnxModel(broken)
    with pytest.raises(tokenpass.TokenpassError, match="kv_budget at generation time needs the torch runtime.s "
                                                       "cache; .* export it with a KV eviction pass"):
        OnnxModel(result.directory).generate(torch.tensor([[1, 2]]), kv_budget=4)


def test_cli_exports_refuses_to_overwrite_and_inspects_the_file(tmp_path):
    out = tmp_path / "gpt2-onnx"
    result = runner.invoke(app, ["export", "gpt2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"exported gpt2 (no passes) to {out}: prefill.onnx, decode.onnx (opset 18)" in result.stdout
    again = runner.invoke(app, ["export", "gpt2", "-o", str(out)])
    assert again.exit_code == 2 and "exists; pass force=True (--force)" in again.stderr
    refused = runner.invoke(app, ["export", "gpt2", "-o", str(tmp_path / "x"), "--passes", "tokenselect"])
    assert refused.exit_code == 2 and "theta=0.9 reuses selections kept" in refused.stderr
    inspected = runner.invoke(app, ["inspect", str(out / "decode.onnx")])
    layers = tokenpass.tiny("gpt2").config.num_hidden_layers
    assert inspected.exit_code == 0 and f"attention sites: {layers}" in inspected.stdout, inspected.output
    assert "gpt2/decode (tokenpass export)" in inspected.stdout and "passes run: none" in inspected.stdout


def test_bench_runs_a_configuration_on_onnxruntime_against_the_torch_baseline():
    model = tokenpass.tiny("qwen2")
    ids = torch.randint(3, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    report = bench(model, {"onnx": []}, token_ids=ids, context=16, continuation=8, greedy_tokens=6, backend="onnx")
    base, onnx_run = report["configs"]
    assert (base["backend"], onnx_run["backend"]) == ("torch", "onnx")
    assert abs(onnx_run["ppl_ratio"] - 1) < 1e-4 and onnx_run["top1_agreement"] == 1.0
    assert onnx_run["greedy_common_prefix"] == 6
    with pytest.raises(tokenpass.TokenpassError, match="onnx backend runs onnxruntime"):
        bench(model, {"onnx": []}, token_ids=ids, context=16, continuation=8, compile=True, backend="onnx")
