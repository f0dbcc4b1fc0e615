import json

import pytest
from typer.testing import CliRunner

import tokenpass
from tokenpass.bench import bench
from tokenpass.cli import app, torch_random_ids
from tokenpass.errors import TokenpassError

KEYS = {"ppl", "ppl_ratio", "top1_agreement", "kl", "decode_tokens_per_s", "decode_speedup", "kv_bytes", "kv_read_bytes_per_step",
        "peak_memory_bytes", "prefill_tokens_per_s", "decode_latency_ms", "greedy_common_prefix"}


def test_cli_json_has_every_figure_and_exact_passes_cost_nothing():
    result = CliRunner().invoke(app, ["bench", "llama", "--passes", "eliminate_noops", "--context", "40",
                                      "--continuation", "12", "--greedy", "6", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    base, opt = report["configs"]
    assert base["name"] == "baseline" and opt["passes"] == ["eliminate_noops"]
    for config in (base, opt):
        assert KEYS <= set(config)
        assert config["ppl_ratio"] == pytest.approx(1.0) and config["top1_agreement"] == 1.0
        assert config["kl"] == pytest.approx(0.0, abs=1e-6) and config["greedy_common_prefix"] == 6
        assert config["kv_bytes"] > 0
    assert base["decode_speedup"] == 1.0


@pytest.mark.parametrize("context,continuation,message", [
    (500, 100, "exceeds the model's 512 positions"),
    (0, 10, "need context >= 1"),
    (10, 1, "continuation >= 2"),
])
def test_bad_bench_sizes_are_clear_errors(context, continuation, message):
    model = tokenpass.tiny("llama")
    with pytest.raises(TokenpassError, match=message):
        bench(model, [], token_ids=torch_random_ids(320, 700), context=context, continuation=continuation)
