"""``tokenpass bench``: what a pass list buys (speed, memory) and costs (quality), measured in one process.

Quality is teacher-forced so every prediction goes through the optimised runtime: prefill a context of
C tokens of real text, then feed the M tokens that follow one decode step at a time. Each step's
next-token distribution is compared with the baseline's (the runtime with no method passes, which the
tests hold to the original model's logits and greedy tokens) on the same tokens: perplexity and its ratio, top-1 agreement
and mean KL(baseline || optimised). A greedy continuation's common prefix is reported as illustration
only: single greedy continuations diverge at the first near-tie even for good methods.

Everything runs on the model's device: the tokens are moved there, CUDA timings wait for the queued
work (``_clock``), and peak memory comes from the CUDA allocator there (the process's on CPU).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokenpass.api import capture, check_passes, fork, optimize_graphs
from tokenpass.errors import TokenpassError
from tokenpass.ir.capture import model_device
from tokenpass.runtime.generate import positions_from_mask
from tokenpass.runtime.memory import PeakMemory
from tokenpass.onnx_export import export_onnx
from tokenpass.runtime.model import OptimizedModel
from tokenpass.runtime.onnx_session import OnnxModel
from tokenpass.progress import status, steps

BASELINE = "baseline"
BACKENDS = ("torch", "onnx")


@dataclass
class Run:
    """Raw figures of one configuration on the shared tokens."""

    logprobs: torch.Tensor  # [M, V] next-token log-probabilities, one row per continuation token
    prefill_s: float
    decode_s: float
    decode_steps: int
    kv_bytes: int
    peak_bytes: int
    kv_read_bytes: int | None  # cache bytes the decode steps' attention read (None: no runtime cache)


def _clock(device: torch.device) -> float:
    """``time.perf_counter`` once ``device`` has finished its queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def teacher_forced(model: OptimizedModel, context: torch.Tensor, continuation: torch.Tensor, label: str) -> Run:
    """Prefill ``context`` [1, C], then decode ``continuation`` [M] one token per step, on the model's device."""
    device = model.spec.device
    context, continuation = context.to(device), continuation.to(device)
    _warm_up(model, context)
    valid = torch.ones((1, 1), dtype=torch.long, device=device)
    positions = positions_from_mask(torch.ones_like(context))
    rows = []
    with PeakMemory(device) as memory, torch.no_grad():
        session = model.session(1, capacity=context.shape[1] + len(continuation))
        with status(f"{label}: prefill of {context.shape[1]} tokens"):
            start = _clock(device)
            logits = session.step(context, torch.ones_like(context), positions, last_only=True)
            prefill_s = _clock(device) - start
        rows.append(logits[0, -1].float().log_softmax(-1))
        cache = session.cache
        read_before = getattr(cache, "bytes_read", None)
        start = _clock(device)
        for i in steps(range(len(continuation) - 1), f"{label}: decoding"):
            positions = positions[:, -1:] + 1
            logits = session.step(continuation[i].view(1, 1), valid, positions)
            rows.append(logits[0, -1].float().log_softmax(-1))
        decode_s = _clock(device) - start
    read = None if read_before is None else cache.bytes_read - read_before
    return Run(torch.stack(rows), prefill_s, decode_s, len(continuation) - 1, cache.nbytes(), memory.peak_bytes, read)


def _warm_up(model: OptimizedModel, context: torch.Tensor) -> None:
    """One short prefill and decode step so first-call costs do not land in the timed figures."""
    model.generate(context[:, :8], max_new_tokens=2)


def compare(run: Run, base: Run, targets: torch.Tensor, context_len: int) -> dict:
    """The figures ``--json`` prints for one configuration."""
    nll = -run.logprobs.gather(1, targets[:, None]).squeeze(1)
    base_nll = -base.logprobs.gather(1, targets[:, None]).squeeze(1)
    kl = F.kl_div(run.logprobs, base.logprobs, log_target=True, reduction="none").sum(-1)
    decode_tps = run.decode_steps / run.decode_s if run.decode_s else float("nan")
    base_tps = base.decode_steps / base.decode_s if base.decode_s else float("nan")
    return {
        "ppl": math.exp(nll.mean().item()),
        "ppl_ratio": math.exp(nll.mean().item() - base_nll.mean().item()),
        "top1_agreement": (run.logprobs.argmax(-1) == base.logprobs.argmax(-1)).float().mean().item(),
        "kl": kl.mean().item(),
        "prefill_tokens_per_s": context_len / run.prefill_s,
        "decode_tokens_per_s": decode_tps,
        "decode_speedup": decode_tps / base_tps,
        "decode_latency_ms": 1000 * run.decode_s / max(run.decode_steps, 1),
        "kv_bytes": run.kv_bytes,
        "kv_read_bytes_per_step": None if run.kv_read_bytes is None else run.kv_read_bytes / max(run.decode_steps, 1),
        "peak_memory_bytes": run.peak_bytes,
    }


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    same = (a == b).long().cumprod(0)
    return int(same.sum())


def bench(
    model: nn.Module,
    passes: Sequence[str] | Mapping[str, Sequence[str]] = (),
    *,
    token_ids: Sequence[int],
    context: int = 512,
    continuation: int = 256,
    greedy_tokens: int = 32,
    name: str | None = None,
    compile: bool = False,
    backend: str = "torch",
) -> dict:
    """Measure ``passes`` (one list, or a mapping of configuration name -> list) against the baseline, on
    the model's device (reported as ``device``).

    Every configuration's passes are checked (names, options, order, the model's shape) before the
    baseline runs: a typo in the last configuration must not cost the minutes of the first ones.
    ``compile=True`` compiles every configuration's steps, the baseline's included; each configuration's
    ``compile_s`` is what its compilations cost (first calls, in the warm-up, never in the timed figures).
    ``backend="onnx"`` exports every configuration (``tokenpass.export_onnx``) and runs it with onnxruntime
    (``OnnxModel``) against the baseline on the torch runtime; export time is not in the timed figures.
    """
    configs = dict(passes) if isinstance(passes, Mapping) else {"optimized": list(passes)}
    if backend not in BACKENDS:
        raise TokenpassError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "onnx" and compile:
        raise TokenpassError("compile=True compiles the torch runtime's steps; the onnx backend runs onnxruntime")
    _validate(model, context, continuation, len(token_ids))
    check_passes(model, list(configs.values()), name=name)
    device = model_device(model)
    ids = torch.tensor(list(token_ids[: context + continuation]), dtype=torch.long, device=device)
    prompt, cont = ids[:context].view(1, -1), ids[context:]
    captured = capture(model, name=name)  # once: each configuration rewrites its own fork
    results, base, base_greedy = [], None, None
    workdir = tempfile.TemporaryDirectory(prefix="tokenpass-bench-")
    for label, pass_list in {BASELINE: [], **configs}.items():
        if backend == "onnx" and label != BASELINE:
            optimized = OnnxModel(export_onnx(model, Path(workdir.name) / "export", passes=pass_list,
                                              force=True).directory)
        else:
            optimized = optimize_graphs(fork(captured), pass_list, compile=compile)
        run = teacher_forced(optimized, prompt, cont, label)
        greedy = optimized.generate(prompt, max_new_tokens=greedy_tokens)[0, context:] if greedy_tokens else None
        if base is None:
            base, base_greedy = run, greedy
        figures = compare(run, base, cont, context)
        figures["greedy_common_prefix"] = _common_prefix(greedy, base_greedy) if greedy is not None else None
        report = getattr(optimized, "compile_report", None)
        figures["compile_s"] = None if report is None else report.seconds()
        runs_on = backend if label != BASELINE else "torch"
        results.append({"name": label, "passes": list(pass_list), "backend": runs_on, **figures})
    workdir.cleanup()
    return {
        "model": name,
        "context": context,
        "continuation": continuation,
        "greedy_tokens": greedy_tokens,
        "compiled": compile,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "configs": results,
    }


def _validate(model: nn.Module, context: int, continuation: int, available: int) -> None:
    if context < 1 or continuation < 2:
        raise TokenpassError(f"need context >= 1 and continuation >= 2 tokens, got {context} and {continuation}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and context + continuation > limit:
        raise TokenpassError(f"context {context} + continuation {continuation} exceeds the model's {limit} positions")
    if available < context + continuation:
        raise TokenpassError(f"the text has {available} tokens, fewer than context + continuation")
