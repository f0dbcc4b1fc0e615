"""Where one decode step spends its time: weights GEMV, attention, the rest; eager and compiled.

For each configuration (``dense`` or one pass spec) and mode (eager, compiled) on SmolLM2: prefill
``--context`` tokens of real text and warm up; then time teacher-forced decode steps one by one, in
``--rounds`` rounds interleaved across the rows (the median is the ms/token figure), then profile
``--profile-steps`` more under ``torch.profiler`` and split each step into

- weights GEMV: ``aten::linear`` / ``mm`` / ``addmm`` / ``matmul`` outside the attention ops (the
  projections, the MLP and the LM head: the model's weights, read once per token),
- attention: the runtime's cache-reading ops (every ``tokenpass::`` op, whatever the method),
- the rest: the step's remaining time (norms, rotary, residuals, the compiled kernels, dispatch).

The profiler adds a per-op cost, so the profiled step is longer than the timed one, most for eager
graphs with many small ops; the split is per profiled step (medians), ms/token is the unprofiled median.
Compiled mode prints its compile report (each bucket's first call). Timings on a shared machine are
noisy: compare rows of one run.

    .venv/bin/python tools/profile_step.py --context 4096 dense tidaldecode

On a machine shared with other work, ``--threads 1`` avoids OpenMP threads waiting on each other at every
op (with two threads and other processes competing, each parallel region can cost a scheduler slice).

On a GPU (``--model llama-3.2-1b-random --dtype bfloat16``, the model on CUDA), the split is by GPU
kernel time (the kernels each op launched), the step by wall time with the device synchronised.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

import tokenpass
from tokenpass.models import REAL_SHAPES
from tokenpass.runtime.compiled import CompileReport
from tokenpass.runtime.generate import positions_from_mask
from tokenpass.runtime.model import OptimizedModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import load_model, prompt_ids  # noqa: E402 - one way to load a model for timing

STEP = "tokenpass.decode_step"
GEMV_OPS = {"aten::linear", "aten::mm", "aten::addmm", "aten::matmul", "mkldnn::_linear_pointwise",
            "mkl::_mkl_linear"}
ATTENTION_PREFIX = "tokenpass::"


@dataclass
class Breakdown:
    """One configuration and mode: unprofiled ms/token and the profiled split (medians over steps)."""

    config: str
    mode: str
    ms_per_token: float
    profiled_ms: float
    gemv_ms: float
    attention_ms: float
    compile_lines: list[str]

    @property
    def rest_ms(self) -> float:
        return self.profiled_ms - self.gemv_ms - self.attention_ms


def _ancestors(event: FunctionEvent):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _op_time(event: FunctionEvent, cuda: bool) -> float:
    """An op's time (us): on CUDA the GPU time of the kernels it launched, else its CPU time."""
    return event.device_time_total if cuda else event.cpu_time_total


def _outermost(events: list[FunctionEvent], hit: Callable[[FunctionEvent], bool], cuda: bool = False) -> float:
    """Summed time (us) of events ``hit`` selects whose ancestors it does not select (no double counting:
    ``linear`` calls ``addmm``) and that do not run inside an attention op."""
    total = 0.0
    for event in events:
        if not hit(event):
            continue
        if any(hit(a) or a.name.startswith(ATTENTION_PREFIX) for a in _ancestors(event)):
            continue
        total += _op_time(event, cuda)
    return total


def split_steps(events: list[FunctionEvent], cuda: bool = False) -> list[tuple[float, float, float]]:
    """``(step, gemv, attention)`` microseconds for each profiled step."""
    steps = [e for e in events if e.name == STEP]
    rows = []
    for step in steps:
        inside = [e for e in events if e.time_range.start >= step.time_range.start
                  and e.time_range.end <= step.time_range.end and e.thread == step.thread and e is not step]
        gemv = _outermost(inside, lambda e: e.name in GEMV_OPS, cuda)
        attention = _outermost(inside, lambda e: e.name.startswith(ATTENTION_PREFIX), cuda)
        rows.append((step.cpu_time_total, gemv, attention))
    return rows


class Stepper:
    """One configuration and mode, prefilled and ready to decode the text that follows, one token a step."""

    def __init__(self, model: OptimizedModel, ids: torch.Tensor, context: int, config: str, mode: str):
        self.model, self.config, self.mode = model, config, mode
        self.session = model.session(1, capacity=ids.shape[1] + 1)
        self.device = model.spec.device
        ids = ids.to(self.device)
        prompt = ids[:, :context]
        self.positions = positions_from_mask(torch.ones_like(prompt))
        self.session.step(prompt, torch.ones_like(prompt), self.positions, last_only=True)
        self.feed = iter(ids[0, context:].tolist())
        self.valid = torch.ones((1, 1), dtype=torch.long, device=self.device)
        self.times: list[float] = []

    def step(self) -> None:
        self.positions = self.positions[:, -1:] + 1
        self.session.step(torch.tensor([[next(self.feed)]], device=self.device), self.valid, self.positions)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, steps: int) -> None:
        for _ in range(steps):
            start = time.perf_counter()
            self.step()
            self.times.append(time.perf_counter() - start)

    def profiled(self, steps: int) -> Breakdown:
        cuda = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
        with profile(activities=activities) as prof:
            for _ in range(steps):
                with record_function(STEP):
                    self.step()
        rows = split_steps(list(prof.events()), cuda)
        report = self.model.compile_report
        return Breakdown(self.config, self.mode, 1000 * statistics.median(self.times),
                         statistics.median(r[0] for r in rows) / 1000, statistics.median(r[1] for r in rows) / 1000,
                         statistics.median(r[2] for r in rows) / 1000, report.lines() if report else [])


def table(rows: list[Breakdown]) -> str:
    lines = ["| config | mode | ms/token | profiled ms/step | weights GEMV ms | attention ms | rest ms | GEMV % | "
             "attention % | rest % |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        pct = [100 * x / r.profiled_ms for x in (r.gemv_ms, r.attention_ms, r.rest_ms)]
        lines.append(f"| `{r.config}` | {r.mode} | {r.ms_per_token:.1f} | {r.profiled_ms:.1f} | {r.gemv_ms:.1f} | "
                     f"{r.attention_ms:.1f} | {r.rest_ms:.1f} | {pct[0]:.0f} | {pct[1]:.0f} | {pct[2]:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=["dense", "tidaldecode"],
                        help="'dense' or a pass spec (one pass per config)")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per round (median of all)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of timed steps, interleaved across rows")
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--model", default="smollm2", choices=["smollm2", *(f"{n}-random" for n in REAL_SHAPES)])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, total = getattr(torch, args.dtype), args.context + args.warmup + args.rounds * args.steps + args.profile_steps
    model = load_model(args.model, dtype, args.device)
    ids = torch.tensor(prompt_ids(args.model, model.config.vocab_size, total))[None]
    steppers = []
    for config in args.configs:
        eager = tokenpass.optimize(model, passes=[] if config == "dense" else [config])
        for mode in args.modes:
            stepper = Stepper(eager.compiled() if mode == "compiled" else eager, ids, args.context, config, mode)
            for _ in range(args.warmup):
                stepper.step()
            steppers.append(stepper)
            print(f"{config} {mode}: prefilled", *(stepper.model.compile_report or CompileReport()).lines(),
                  sep="\n  ", flush=True)
    for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits every row alike
        for stepper in steppers:
            stepper.timed(args.steps)
    rows = [stepper.profiled(args.profile_steps) for stepper in steppers]
    where = f"cpu x{torch.get_num_threads()} threads" if args.device == "cpu" else args.device
    print(f"\n{args.model} {args.dtype}, context {args.context}, batch 1, {where}; ms/token: median of "
          f"{args.rounds} x {args.steps} steps (interleaved); split: median of {args.profile_steps} profiled steps\n")
    print(table(rows))


if __name__ == "__main__":
    main()
