"""tools/bench_cce.py: its smoke run measures every CPU implementation and each agrees with eager; a wrong
implementation is flagged, not ranked."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(TOOLS))
    try:
        import bench_cce
    finally:
        sys.path.remove(str(TOOLS))
    return bench_cce


CPU_ROWS = ["eager", "torch-compile", "torch-lce-ref", "torch-lce-chunked", "torch-lce-chunked-256", "tokenpass",
            "tokenpass-unfused", "cce-torch-compile"]


def test_smoke_runs_every_implementation_and_each_agrees_with_eager(bench, tmp_path, capsys):
    out = tmp_path / "cce.json"
    report = bench.main(["--smoke", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert "tokenpass" in capsys.readouterr().out  # the table was printed
    rows = {row["impl"]: row for row in report["rows"]}
    assert report["rounds"] == 1 and report["device"] == "cpu"
    package = importlib.util.find_spec("cut_cross_entropy") is not None
    for name in CPU_ROWS:
        row = rows[name]
        if name == "cce-torch-compile" and not package:
            assert row["status"] == "not installable here"
            continue
        assert row["status"] == "ok", (name, row["status"])
        assert row["agrees"] and row["max_rel_diff"] <= report["tolerance"], (name, row["max_rel_diff"])
        assert row["ms"] > 0 and row["peak_mib"] >= 0 and len(row["samples_ms"]) == 1
    assert rows["eager"]["time_vs_eager"] == 1.0 and rows["eager"]["max_rel_diff"] == 0.0
    assert "tokenpass-fused" not in rows  # the CPU default at this vocabulary is the fused variant: no duplicate
    if not torch.cuda.is_available():
        assert rows["cce"]["status"] == rows["liger"]["status"] == "CUDA only"
    assert bench.main(["--render", str(out), "--markdown"]) == report  # a saved report re-renders, runs nothing
    table = capsys.readouterr().out
    assert all(f"| `{name}` |" in table for name in rows)


@pytest.mark.parametrize("wrong", ["loss", "grad"])
def test_an_implementation_that_disagrees_with_eager_is_flagged(bench, monkeypatch, wrong):
    """The check can fail: a loss 1% off, or a loss whose gradient is 1% off, is marked wrong."""
    def broken(fused):
        def run(e, c, targets):
            loss = bench.eager_loss(e, c, targets)
            if wrong == "loss":
                return loss * 1.01
            return loss + 0.01 * (loss - loss.detach())  # same value, gradients scaled by 1.01
        return run

    monkeypatch.setattr(bench, "tokenpass_loss", broken)
    report = bench.main(["--smoke", "--device", "cpu", "--impl", "tokenpass", "--json"])
    row = next(row for row in report["rows"] if row["impl"] == "tokenpass")
    assert not row["agrees"] and row["status"] == "WRONG (over tolerance)"
    assert 5e-3 < row["max_rel_diff"] < 2e-2
