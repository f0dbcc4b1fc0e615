import json

import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from tokenpass.cli import app, main

runner = CliRunner()


def _json(*args):
    result = runner.invoke(app, ["inspect", *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_report_of_a_tiny_model_with_passes():
    report = _json("llama", "--passes", "canonicalize_attention,dce", "--no-lower")  # exactly these passes
    assert report["num_layers"] == 4 and len(report["attention_sites"]) == 4
    assert {s["op"] for s in report["attention_sites"]} == {"tokenpass.attention"}
    canon, dce = report["passes"]
    assert canon["counts"]["sdpa_to_tokenpass_attention"] == 4 and len(canon["replaced"]) == 4
    assert dce["counts"]["nodes_removed"] == len(dce["removed"]) > 0
    assert report["op_histogram"]["tokenpass.attention.default"] == 4
    assert report["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": [report["inputs"][0]["shape"][0], "1"]}


@pytest.mark.smollm2
def test_smollm2_report_has_30_attention_sites():
    report = _json("smollm2")
    assert len(report["attention_sites"]) == 30 and report["num_layers"] == 30
    assert report["parameters"] > 130_000_000
    assert report["attention_sites"][0]["num_kv_heads"] == 3


def test_text_dot_and_svg_outputs(tmp_path):
    text = runner.invoke(app, ["inspect", "gpt2", "--passes", "canonicalize_attention"])
    assert text.exit_code == 0 and "attention by layer (4 sites)" in text.stdout and "sdpa_to_tokenpass_attention=4" in text.stdout
    dot = runner.invoke(app, ["inspect", "gpt2", "--format", "dot"])
    assert dot.stdout.startswith('digraph "gpt2/decode"') and dot.stdout.count("(GPT2Block)") == 4
    svg_path = tmp_path / "layers.svg"
    assert runner.invoke(app, ["inspect", "qwen2", "--format", "svg", "-o", str(svg_path)]).exit_code == 0
    svg = svg_path.read_text()
    assert svg.startswith("<svg") and svg.count("Qwen2DecoderLayer") == 4


def test_saved_program_round_trip(tmp_path):
    path = tmp_path / "decode.pt2"
    args = ["capture", "mistral", "-o", str(path), "--passes", "canonicalize_attention", "--no-lower"]
    assert runner.invoke(app, args).exit_code == 0
    report = _json(str(path))
    assert len(report["attention_sites"]) == 4
    assert {s["op"] for s in report["attention_sites"]} == {"tokenpass.attention"}


def _attention_onnx(path):
    """A one-head attention block built by hand: MatMul -> Div -> Softmax -> MatMul."""
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", "seq", 8])
    k = helper.make_tensor_value_info("kT", TensorProto.FLOAT, ["batch", 8, "seq"])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, ["batch", "seq", 8])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", 8])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [8 ** 0.5])
    nodes = [
        helper.make_node("MatMul", ["q", "kT"], ["s"], name="scores"),
        helper.make_node("Div", ["s", "scale"], ["s2"]),
        helper.make_node("Softmax", ["s2"], ["p"], axis=-1, name="softmax0"),
        helper.make_node("MatMul", ["p", "v"], ["out"]),
    ]
    graph = helper.make_graph(nodes, "attn", [q, k, v], [out], [scale])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_onnx_file_is_described(tmp_path):
    path = tmp_path / "attn.onnx"
    _attention_onnx(str(path))
    report = _json(str(path))
    assert report["attention_sites"] == [{"node": "softmax0"}]
    assert report["op_histogram"] == {"MatMul": 2, "Div": 1, "Softmax": 1}
    assert report["inputs"][0]["shape"] == ["batch", "seq", "8"] and report["parameters"] == 1


def _one_line_error(monkeypatch, capsys, *argv):
    monkeypatch.setattr("sys.argv", ["tokenpass", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_corrupt_onnx_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07garbage-not-a-protobuf" * 10)
    err = _one_line_error(monkeypatch, capsys, "inspect", str(path))
    assert "broken.onnx is not a valid ONNX model" in err


def test_unknown_model_and_pass_are_one_line_errors(monkeypatch, capsys):
    assert "unknown model 'bert'" in _one_line_error(monkeypatch, capsys, "inspect", "bert")
    assert "unknown pass 'speedy'" in _one_line_error(monkeypatch, capsys, "inspect", "llama", "--passes", "speedy")


def test_passes_command_lists_registry():
    result = runner.invoke(app, ["passes"])
    assert "canonicalize_attention" in result.stdout and "dce" in result.stdout
