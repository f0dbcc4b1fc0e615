import json
import re

import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

import tokenpass
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


TIDAL = "tidaldecode:selection_layers=2"


def test_default_view_is_sites_by_layer_and_what_each_pass_changed():
    """The default answers what a user asks first; symbolic shapes and the op histogram are options."""
    result = runner.invoke(app, ["inspect", "llama", "--passes", TIDAL])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "passes run: canonicalize_attention, lower_kv_cache, tidaldecode, eliminate_noops, dce, select_logit_rows" in out
    assert "attention by layer (4 sites)" in out
    layers_table = out[out.index("attention by layer"):out.index("in every layer")]
    rows = {line.split("│")[1].strip(): line for line in layers_table.splitlines() if line.startswith("│ ")}
    assert set(rows) == {"0-1", "2", "3"}  # layers 0 and 1 are alike and share a row
    assert "tokenpass.selection_attention" in rows["2"] and "tokenpass.sparse_attention" in rows["3"]
    assert rows["3"].split("│")[-2].strip() == "~1"  # tidaldecode replaced layer 3's attention node
    assert "in every layer: canonicalize_attention ~1, lower_kv_cache ~1" in out
    assert "inputs / outputs" not in out and "op histogram (top 15)" not in out and "[s" not in out
    assert len(out.splitlines()) < 35

    with_io = runner.invoke(app, ["inspect", "llama", "--io", "--ops"]).stdout
    assert "inputs / outputs" in with_io and "op histogram (top 15)" in with_io and "past_keys" in with_io


def test_tied_embeddings_are_counted_once():
    model = tokenpass.tiny("gpt2")  # its LM head is the embedding matrix
    assert model.config.tie_word_embeddings
    assert _json("gpt2")["parameters"] == sum(p.numel() for p in model.parameters())


def _drawn_order(svg: str) -> list[str]:
    """Box ids of the SVG from top to bottom."""
    boxes = re.findall(r'<g id="([^"]+)"><rect x="[\d.]+" y="([\d.]+)"', svg)
    return [name for name, _ in sorted(boxes, key=lambda b: float(b[1]))]


def test_picture_keeps_the_layer_order_when_a_pass_links_layers(tmp_path):
    """A cross-layer edge between the same two layers as a chain edge used to replace it, scrambling the order."""
    svg_path = tmp_path / "tidal.svg"
    result = runner.invoke(app, ["inspect", "llama", "--passes", TIDAL, "--format", "svg", "-o", str(svg_path)])
    assert result.exit_code == 0, result.output
    svg = svg_path.read_text()
    assert _drawn_order(svg) == ["inputs", "layer0", "layer1", "layer2", "layer3", "norm", "lm_head"]
    assert svg.count('marker-end="url(#chain-head)"') == 6  # every chain edge drawn, with an arrow
    assert svg.count('marker-end="url(#cross-head)"') == 2  # the selection edge 2 -> 3 beside it, and the legend

    dot = runner.invoke(app, ["inspect", "llama", "--passes", TIDAL, "--format", "dot"]).stdout
    chain = re.findall(r'^  "(\w+)" -> "(\w+)";$', dot, flags=re.M)
    assert chain == [("inputs", "layer0"), ("layer0", "layer1"), ("layer1", "layer2"), ("layer2", "layer3"),
                     ("layer3", "norm"), ("norm", "lm_head")]
    assert '"layer2" -> "layer3" [style=dashed' in dot


def test_png_picture(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    path = tmp_path / "tidal.png"
    result = runner.invoke(app, ["inspect", "llama", "--passes", TIDAL, "--format", "png", "-o", str(path)])
    assert result.exit_code == 0, result.output
    image = Image.open(path)
    assert image.format == "PNG" and image.width > 800 and image.height > 800
    orange = image.getpixel((2 * 470, 2 * (112 + 3 * 50 + 8)))  # right end of layer 2's box, clear of text
    assert orange == (0xFD, 0xE3, 0xBF)


def test_diff_shows_each_pass_nodes_with_provenance():
    result = runner.invoke(app, ["inspect", "llama", "--passes", "canonicalize_attention,dce", "--no-lower", "--diff"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "canonicalize_attention on llama/decode: ~4 replaced, +0 added, -0 removed" in out
    replaced = [line.split("│")[3:5] for line in out.splitlines() if "scaled_dot_product_attention_3 " in line]
    assert [cell.strip() for cell in replaced[0]] == ["scaled_dot_product_attention_3",
                                                      "aten.scaled_dot_product_attention.default"]
    assert "-> attention_default_3" in out and "-> tokenpass.attention.default" in out
    assert re.search(r"dce on llama/decode: ~0 replaced, \+0 added, -\d+ removed", out)
    assert "aten.expand.default" in out  # the GQA head repeats dce removed

    report = _json("llama", "--passes", "canonicalize_attention", "--no-lower")
    (canon,) = report["passes"]
    new = canon["replaced"]["scaled_dot_product_attention"]
    assert canon["nodes"][new] == {"op": "tokenpass.attention.default", "layer": 0, "module": "model.layers.0.self_attn",
                                   "made_by": {"pass": "canonicalize_attention", "replaces": "scaled_dot_product_attention"}}
    assert canon["nodes"]["scaled_dot_product_attention"]["op"] == "aten.scaled_dot_product_attention.default"
