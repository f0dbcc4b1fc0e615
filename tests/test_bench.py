import json

import pytest
from typer.testing import CliRunner

import tokenpass
from tokenpass.bench import bench
from tokenpass.cli import app, torch_random_ids
from tokenpass.errors import TokenpassError

KEYS = {"ppl", "ppl_ratio", "top1_agreement", "kl", "decode_tokens_per_s", "decode_speedup", "kv_bytes", "kv_read_bytes_per_step",
        "peak_memory_bytes", "prefill_tokens_per_s", "decode_latency_ms", "greedy_common_prefix"}

CONTEXT, CONTINUATION, GREEDY = 64, 12, 6
# The teacher-forced decode steps see at most CONTEXT + CONTINUATION - 2 past slots (the last continuation
# token is only a target), and the greedy run fewer: a top_k of exactly that covers every slot of every
# step, the boundary at which selection must fall back to dense attention. Pass names are strings so the
# test does not depend on where the TidalDecode module lives.
LOSSY = "tidaldecode:top_k=8:sparse_start=1:selection_layers=1"
COVERING = f"tidaldecode:top_k={CONTEXT + CONTINUATION - 2}:sparse_start=1:selection_layers=1"


def _bench_json(*pass_lists: str) -> dict[str, dict]:
    """``tokenpass bench llama --json`` with one ``--passes`` per list; configurations by name."""
    args = ["bench", "llama", "--context", str(CONTEXT), "--continuation", str(CONTINUATION), "--greedy", str(GREEDY), "--json"]
    for passes in pass_lists:
        args += ["--passes", passes]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    configs = json.loads(result.stdout)["configs"]
    return {config["name"]: config for config in configs}


def test_cli_json_tells_a_lossy_method_from_one_that_must_equal_the_baseline():
    """Two configurations that really differ from the baseline graph (both rewrite the decode graph with
    selection and sparse attention ops), one that must cost nothing and one that must cost quality.

    The covering configuration selects every past slot on every step, so its figures must be the
    baseline's exactly, reads and memory included. The lossy one (top_k=8 of 64+ slots from layer 1 on)
    must show a quality cost on every measure, read less than half the cache per decode step, and hold at
    least the baseline's cache (it adds the ranking copy of the keys, it evicts nothing).
    """
    configs = _bench_json(LOSSY, COVERING)
    assert list(configs) == ["baseline", LOSSY, COVERING]
    base, lossy, covering = configs["baseline"], configs[LOSSY], configs[COVERING]
    assert lossy["passes"] == [LOSSY] and covering["passes"] == [COVERING] and base["passes"] == []
    for config in configs.values():
        assert KEYS <= set(config)
        assert config["kv_bytes"] > 0 and config["kv_read_bytes_per_step"] > 0
    assert base["decode_speedup"] == 1.0

    for exact in (base, covering):
        assert exact["ppl_ratio"] == pytest.approx(1.0, abs=1e-6) and exact["top1_agreement"] == 1.0
        assert exact["kl"] == pytest.approx(0.0, abs=1e-6) and exact["greedy_common_prefix"] == GREEDY
    assert covering["ppl"] == pytest.approx(base["ppl"], rel=1e-6)
    assert covering["kv_read_bytes_per_step"] == base["kv_read_bytes_per_step"]
    assert covering["kv_bytes"] == lossy["kv_bytes"]  # the same declared ranking copy, used or not

    assert abs(lossy["ppl_ratio"] - 1.0) > 1e-4 and lossy["kl"] > 1e-4 and lossy["top1_agreement"] < 1.0
    assert lossy["kv_read_bytes_per_step"] < base["kv_read_bytes_per_step"] / 2
    assert lossy["kv_bytes"] > base["kv_bytes"]  # the ranking copy is held beside the cache


@pytest.mark.parametrize("context,continuation,message", [
    (500, 100, "exceeds the model's 512 positions"),
    (0, 10, "need context >= 1"),
    (10, 1, "continuation >= 2"),
])
def test_bad_bench_sizes_are_clear_errors(context, continuation, message):
    model = tokenpass.tiny("llama")
    with pytest.raises(TokenpassError, match=message):
        bench(model, [], token_ids=torch_random_ids(320, 700), context=context, continuation=continuation)
