"""Vocabulary-parallel Cut Cross-Entropy against the single-process definition.

Two gloo ranks on the CPU are spawned once for the module (a spawn costs seconds; the cases are tiny):
each runs every case on its vocabulary shard and saves loss, LSE and gradients; the parent compares them
with ``linear_cross_entropy_reference`` on the full head under plain autograd (fp64: exact to rounding),
rank by rank for the replicated outputs and shard by shard (concatenated) for the head's gradients.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tokenpass.errors import TokenpassError
from tokenpass.kernels import linear_cross_entropy_ref as ref
from tokenpass.methods.cutcrossentropy import vocab_parallel_linear_cross_entropy
from tokenpass.methods.cutcrossentropy.distributed import shard_vocab

WORLD = 2
IGNORE = -100

# splits: rows per rank (None: shard_vocab's even split); batch: hidden's leading shape; zloss: add lse's term.
CASES = {
    "uneven_bias_softcap_mean_shift": dict(vocab=37, splits=(19, 18), batch=(3, 11), bias=True, softcap=4.0,
                                           reduction="mean", shift=1, dtype=torch.float64, zloss=False),
    "lopsided_sum_flat": dict(vocab=37, splits=(30, 7), batch=(29,), bias=False, softcap=None, reduction="sum",
                              shift=0, dtype=torch.float64, zloss=False),
    "none_softcap_shift_zloss": dict(vocab=40, splits=None, batch=(2, 9), bias=True, softcap=3.0, reduction="none",
                                     shift=1, dtype=torch.float64, zloss=True),
    "fp32_mean": dict(vocab=53, splits=None, batch=(4, 8), bias=True, softcap=None, reduction="mean", shift=1,
                      dtype=torch.float32, zloss=False),
    "bf16_sum_softcap": dict(vocab=33, splits=None, batch=(2, 10), bias=True, softcap=5.0, reduction="sum", shift=0,
                             dtype=torch.bfloat16, zloss=False),
}
FEATURES = 16
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to each tensor's max


def _inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Full hidden, head, targets (~20% ignored) and bias in the case's dtype; the same on every process."""
    g = torch.Generator().manual_seed(len(case["batch"]) * 100 + case["vocab"])
    hidden = torch.randn(*case["batch"], FEATURES, generator=g, dtype=torch.float64)
    weight = torch.randn(case["vocab"], FEATURES, generator=g, dtype=torch.float64) * (3 / math.sqrt(FEATURES))
    bias = torch.randn(case["vocab"], generator=g, dtype=torch.float64) if case["bias"] else None
    targets = torch.randint(0, case["vocab"], case["batch"], generator=g)
    targets[torch.rand(case["batch"], generator=g) < 0.2] = IGNORE
    dtype = case["dtype"]
    return hidden.to(dtype), weight.to(dtype), targets, None if bias is None else bias.to(dtype)


def _upstream(loss: torch.Tensor) -> torch.Tensor | float:
    """Random per-row weights for ``reduction='none'`` (so each row's gradient is checked), else 1."""
    g = torch.Generator().manual_seed(7)
    return torch.rand(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype) if loss.dim() else 1.0


def _loss_and_grads(fn, hidden, weight, bias, zloss: bool) -> dict[str, torch.Tensor]:
    """Loss, LSE and gradients of ``sum(loss * upstream) (+ 1e-2 * sum(lse^2))`` through ``fn(h, w, b)``."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    loss, lse = fn(h, w, b)
    objective = (loss * _upstream(loss)).sum()
    (objective + 1e-2 * lse.pow(2).sum() if zloss else objective).backward()
    out = {"loss": loss, "lse": lse, "d_hidden": h.grad, "d_weight": w.grad}
    if b is not None:
        out["d_bias"] = b.grad
    return {k: v.detach() for k, v in out.items()}


def _shard_bounds(case: dict, rank: int) -> tuple[int, int]:
    if case["splits"] is None:
        shard, start = shard_vocab(torch.empty(case["vocab"], 0), rank, WORLD)
        return start, shard.shape[0]
    return sum(case["splits"][:rank]), case["splits"][rank]


def _rank_case(case: dict, rank: int) -> dict[str, torch.Tensor]:
    hidden, weight, targets, bias = _inputs(case)
    start, length = _shard_bounds(case, rank)
    weight_shard = weight[start:start + length]
    bias_shard = None if bias is None else bias[start:start + length]

    def fn(h, w, b):
        return vocab_parallel_linear_cross_entropy(h, w, targets, start, case["vocab"], b, IGNORE, case["softcap"],
                                                   case["reduction"], case["shift"], return_lse=True)

    return _loss_and_grads(fn, hidden, weight_shard, bias_shard, case["zloss"])


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {name: _rank_case(case, rank) for name, case in CASES.items()}
        hidden, weight, targets, _ = _inputs(CASES["lopsided_sum_flat"])
        start, length = _shard_bounds(CASES["lopsided_sum_flat"], rank)
        try:  # shards tile 37 rows, the caller claims 38: every rank must raise, none may hang
            vocab_parallel_linear_cross_entropy(hidden, weight[start:start + length], targets, start, 38)
            results["tiling_error"] = ""
        except TokenpassError as error:
            results["tiling_error"] = str(error)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("cce_distributed")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(WORLD)]


def _reference(case: dict) -> dict[str, torch.Tensor]:
    """The full head on one process, fp64 logits from the case's (rounded) inputs."""
    hidden, weight, targets, bias = _inputs(case)
    hidden, weight, bias = hidden.double(), weight.double(), None if bias is None else bias.double()

    def fn(h, w, b):
        return ref.linear_cross_entropy_reference(h, w, targets, b, IGNORE, case["softcap"], case["reduction"],
                                                  case["shift"])

    return _loss_and_grads(fn, hidden, weight, bias, case["zloss"])


def _assert_close(name: str, ours: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert ours.shape == expected.shape, name
    scale = expected.abs().max().clamp_min(1e-30)
    error = ((ours.double() - expected) / scale).abs().max().item()
    assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process(rank_results, name):
    case = CASES[name]
    expected = _reference(case)
    for rank, results in enumerate(rank_results):
        ours = results[name]
        for key in ("loss", "lse", "d_hidden"):  # replicated: every rank holds the full value
            _assert_close(f"rank {rank} {key}", ours[key], expected[key], case["dtype"])
        assert ours["d_hidden"].dtype == case["dtype"]
        assert ours["loss"].dtype == ref.accumulation_dtype(case["dtype"])
    for key in ("d_weight", "d_bias") if case["bias"] else ("d_weight",):  # sharded: concatenated in rank order
        _assert_close(key, torch.cat([results[name][key] for results in rank_results]), expected[key], case["dtype"])


def test_shards_must_tile_the_vocabulary(rank_results):
    for results in rank_results:
        assert "hold 37 vocabulary rows in all but vocab_size is 38" in results["tiling_error"]


def test_mismatched_features_raise_before_any_collective():
    hidden, weight, targets, _ = _inputs(CASES["fp32_mean"])
    with pytest.raises(TokenpassError, match=r"weight_shard has 8 features but hidden has 16") as caught:
        vocab_parallel_linear_cross_entropy(hidden, weight[:20, :8], targets, 0, 53)  # no process group exists
    assert "\n" not in str(caught.value)
    with pytest.raises(TokenpassError, match=r"vocab_start 40 with a 20-row shard must lie within vocab_size 53"):
        vocab_parallel_linear_cross_entropy(hidden, weight[:20], targets, 40, 53)


def test_shard_vocab_splits_evenly_and_covers():
    weight = torch.arange(37.0)[:, None]
    shards = [shard_vocab(weight, rank, 3) for rank in range(3)]
    assert [(s.shape[0], start) for s, start in shards] == [(13, 0), (12, 13), (12, 25)]
    assert torch.equal(torch.cat([s for s, _ in shards]), weight)
    with pytest.raises(TokenpassError, match="rank must be in"):
        shard_vocab(weight, 3, 3)
