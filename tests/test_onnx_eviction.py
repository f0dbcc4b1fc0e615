"""KV eviction (Keyformer, H2O, StreamingLLM) on the explicit cache and in ONNX exports.

On the explicit cache the step returns each layer's scores (``kv_scores``) and the ``kvevict.explicit``
policy evicts between steps with the runtime policy's rule; the ONNX runtime runs that policy between
onnxruntime steps. Both must decode what the torch runtime (eviction on its own cache) decodes, while
that visibly differs from dense decoding (so a run that forgot to evict would fail).
"""

import json

import pytest
import torch
from typer.testing import CliRunner

import tokenpass
from tokenpass.cli import app
from tokenpass.errors import PassError, TokenpassError
from tokenpass.methods.kvevict.policy import Evict
from tokenpass.onnx_export import export_onnx
from tokenpass.passes import Pass
from tokenpass.runtime.onnx_session import OnnxModel
from tokenpass.runtime.session import ExplicitSession

from conftest import hf_tiny, padded_batch, teacher_forced

NEW_TOKENS = 64
LENGTH, PAD, BUDGET = 20, 5, 8  # an 8-slot budget under 15- and 20-token prompts: every step evicts


def method(name: str) -> Pass:
    return {"h2o": lambda: tokenpass.H2O(kv_budget=BUDGET),
            "streamingllm": lambda: tokenpass.StreamingLLM(kv_budget=BUDGET, sinks=2),
            "keyformer": lambda: tokenpass.Keyformer(kv_budget=BUDGET, tau_horizon=16)}[name]()


# Keyformer's Gumbel noise (the prompt scored by the policy from the step's queries) and temperature
# schedule on RoPE + GQA; StreamingLLM (no scores); H2O's prompt sums on gemma: soft-capped scores and
# an additive mask through the ONNX translation.
CASES = [("keyformer", "llama"), ("streamingllm", "llama"), ("h2o", "gemma")]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(case) for case in CASES])
def exported(request, tmp_path_factory):
    name, family = request.param
    model = tokenpass.tiny(family).eval()
    directory = tmp_path_factory.mktemp("onnx") / f"{name}-{family}"
    return model, name, export_onnx(model, directory, passes=[method(name)])


def test_onnx_and_explicit_runtimes_generate_the_torch_runtimes_tokens_for_a_left_padded_batch(exported):
    model, name, result = exported
    ids, mask = padded_batch(model.config.vocab_size, batch=2, length=LENGTH, pad=PAD)
    expected = tokenpass.optimize(model, [method(name)]).generate(ids, mask, max_new_tokens=NEW_TOKENS)
    explicit = tokenpass.optimize(model, ["canonicalize_attention", method(name)], lower=False)
    dense = tokenpass.optimize(model, []).generate(ids, mask, max_new_tokens=NEW_TOKENS)
    assert (expected != dense).any()
    assert torch.equal(explicit.generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)
    assert torch.equal(OnnxModel(result.directory).generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)


def test_onnx_logits_match_the_torch_runtime_and_the_cache_stays_at_the_budget(exported):
    model, name, result = exported
    ids, mask = padded_batch(model.config.vocab_size, batch=2, length=LENGTH + 12, pad=PAD)
    got, session = teacher_forced(OnnxModel(result.directory), ids, mask, LENGTH)
    expected, _ = teacher_forced(tokenpass.optimize(model, [method(name)]), ids, mask, LENGTH)
    assert (got - expected).abs().max() < 1e-3
    assert {k.shape[2] for k in session.cache.keys} == {BUDGET}  # compacted to the budget after every step
    assert session.cache.mask.sum(1).tolist() == [BUDGET, BUDGET]
    assert session.policies[0].evicted > 0


def test_the_manifest_names_the_policy_and_no_genai_config_is_written(exported):
    _, name, result = exported
    manifest = json.loads((result.directory / "tokenpass_onnx.json").read_text())
    assert [p["name"] for p in manifest["policies"]] == ["kvevict.explicit"]
    assert manifest["policies"][0]["options"]["budget"] == BUDGET
    outputs = {"streamingllm": {}, "h2o": {"prefill": ["kv_scores"], "decode": ["kv_scores"]},
               "keyformer": {"prefill": ["kv_queries"], "decode": ["kv_scores"]}}
    assert manifest["outputs"] == outputs[name]
    assert not (result.directory / "genai_config.json").exists()  # genai's generator would not evict


def test_explicit_rewrite_counts_and_second_application_is_a_no_op():
    optimized = tokenpass.optimize(tokenpass.tiny("llama"), ["canonicalize_attention", method("h2o"), method("h2o")],
                                   lower=False)
    first, second = [r for r in optimized.reports["decode"] if r.pass_name == "h2o"]
    assert first.counts == {"scored_layers": 4, "explicit_cache": 1}
    assert second.counts == {"already_applied": 1} and not second.modified
    assert optimized.step_graphs["decode"].step_outputs == ["kv_scores"]
    assert len(optimized.step_graphs["decode"].signature()["outputs"]) == 1 + 3 * 4


def test_sliding_windows_are_refused_on_the_explicit_cache_saying_why(tmp_path):
    windowed = hf_tiny("mistral", sliding_window=8)
    with pytest.raises(PassError, match=r"layer 0 attention.* sliding window of 8") as info:
        export_onnx(windowed, tmp_path / "out", passes=[method("h2o")])
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_a_policy_on_the_runtime_cache_is_refused_by_the_explicit_session():
    optimized = tokenpass.optimize(tokenpass.tiny("llama"), [], lower=False)
    with pytest.raises(TokenpassError, match="policy 'kvevict' acts on the runtime's KV cache"):
        ExplicitSession(optimized.step_graphs, optimized.spec, 1, [Evict(budget=4)])


def test_cli_exports_an_evicting_model_and_inspect_shows_its_policy(tmp_path):
    out = tmp_path / "h2o"
    result = CliRunner().invoke(app, ["export", "llama", "-o", str(out), "--passes", f"h2o:kv_budget={BUDGET}"])
    assert result.exit_code == 0, result.output
    assert "h2o" in result.stdout and (out / "decode.onnx").is_file()
    shown = CliRunner().invoke(app, ["inspect", str(out / "decode.onnx")])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.stdout.split())
    assert "tokenpass.ScoredAttention: layers 0-3" in text and "output group kv_scores_<layer>" in text
    assert f"policy kvevict.explicit(budget={BUDGET}," in text and "run by OnnxModel between steps" in text
