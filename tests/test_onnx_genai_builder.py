"""Passes on a decoder built by onnxruntime-genai's model builder (``tools/genai_builder_export.py``):
attention is onnxruntime's fused ``com.microsoft.GroupQueryAttention`` (packed QKV, rotary inside the
op, padding as right-aligned ``seqlens_k``) and the norms are onnxruntime's ``SimplifiedLayerNormalization``.

``optimize_onnx`` lowers both to standard ops around ``tokenpass.Attention`` calls, checks the result
against the file as built, and then rewrites it like any other: tokenpass's runtimes, which pad on the
left, generate the torch path's tokens from it.
"""

import json

import onnx
import pytest
import torch
from onnx import helper

import tokenpass
from genai_builder_export import genai_export
from tokenpass.errors import CaptureError
from tokenpass.onnx_export import token_ids
from tokenpass.runtime.onnx_session import MANIFEST, OnnxModel

from conftest import genai_generate, hf_tiny, padded_batch

NEW_TOKENS = 32
PASSES = {  # no pass at all is the canonical file alone, which layer 0 of TidalDecode's already runs
    "tidaldecode": [tokenpass.TidalDecode(top_k=4, sparse_start=1, selection_layers=[1])],
    "tokenselect": [tokenpass.TokenSelect(top_k=4, n_init=2, n_local=3, theta=None)],
}


@pytest.fixture(scope="module")
def model():
    return hf_tiny("llama")


@pytest.fixture(scope="module")
def built(model, tmp_path_factory):
    return genai_export(model, tmp_path_factory.mktemp("genai") / "built")


@pytest.mark.parametrize("name", sorted(PASSES))
def test_a_genai_builder_model_generates_the_torch_paths_tokens_on_a_left_padded_batch(name, model, built, tmp_path):
    passes = PASSES[name]
    out = tokenpass.optimize_onnx(built, tmp_path / name, passes, token_ids=token_ids(model))
    ids, mask = padded_batch(model.config.vocab_size, batch=2, length=12, pad=5)
    expected = tokenpass.optimize(model, passes).generate(ids, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(OnnxModel(out.directory).generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)
    changes = json.loads((out.directory / MANIFEST).read_text())["changes"]
    assert changes["prefill"]["canonicalize_attention"] == {"com_microsoft_gqa_sites": 4}
    for phase in ("prefill", "decode"):
        graph = onnx.load(str(out.directory / f"{phase}.onnx")).graph
        fused = [n.op_type for n in graph.node if n.op_type in ("GroupQueryAttention", "SimplifiedLayerNormalization")]
        assert not fused  # spelled out: ONNX's full checker (run on write) knows every standard-domain op
    if name == "tidaldecode":
        assert changes["decode"]["tidaldecode"] == {"dense_layers": 1, "selection_layers": 1, "sparse_layers": 2}
        one = ids[1:]
        alone = tokenpass.optimize(model, passes).generate(one, max_new_tokens=NEW_TOKENS)
        assert torch.equal(genai_generate(out.directory, one, NEW_TOKENS), alone)


def _with_attribute(built, tmp_path, **attributes):
    """The built model with every GroupQueryAttention's ``attributes`` changed."""
    proto = onnx.load(str(built))
    for node in proto.graph.node:
        if node.op_type == "GroupQueryAttention":
            kept = [a for a in node.attribute if a.name not in attributes]
            del node.attribute[:]
            node.attribute.extend([*kept, *(helper.make_attribute(k, v) for k, v in attributes.items())])
    path = tmp_path / "changed.onnx"
    onnx.save(proto, path)
    return path


def test_a_sliding_window_group_query_attention_is_refused_by_name(built, tmp_path):
    path = _with_attribute(built, tmp_path, local_window_size=4)
    message = "GroupQueryAttention.*: com.microsoft GroupQueryAttention with a local \\(sliding\\) window"
    with pytest.raises(CaptureError, match=message):
        tokenpass.optimize_onnx(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
