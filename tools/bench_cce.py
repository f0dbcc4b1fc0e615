"""LM head + cross-entropy, forward and backward, side by side in one process (issue 11, Cut Cross-Entropy).

Every implementation computes ``loss = cross_entropy(E @ C.T, targets)`` (mean over the rows whose
target is not ``-100``; about 10% are) with ``E [N, D]`` and ``C [V, D]`` both requiring gradients,
then ``loss.backward()``; one fwd+bwd is one sample. Implementations:

* ``eager``: materialised logits, ``F.cross_entropy(logits.float(), targets)`` (the baseline);
* ``torch-compile``: ``torch.compile`` of that same function (its first call, the compilation, is
  timed on its own and kept out of the rounds);
* ``torch-lce-ref``: torch's ``F.linear_cross_entropy(..., options=None)`` (its reference path);
* ``torch-lce-chunked``: the same with ``options=LinearCrossEntropyOptions()`` (torch's chunked path,
  its defaults); ``torch-lce-chunked-<B>``: ``batch_chunk_size=B`` (``--chunk``, 256 by default);
* ``tokenpass``: ``tokenpass.methods.cutcrossentropy.linear_cross_entropy`` with its defaults (on the
  CPU it picks the fused one-pass variant where it pays off, see ``ref.fused_pays_off``; the table
  names the variant it picked); ``tokenpass-unfused`` / ``tokenpass-fused``: ``fused=False`` / ``True``
  explicitly (the one the default already is is left out of the default list: it would be a
  duplicate row);
* ``cce-torch-compile``: the ``cut-cross-entropy`` package (Apple's CCE), ``impl="torch_compile"``
  (when installed; it is no dependency of this project: ``pip install --no-deps cut-cross-entropy``);
* CUDA only: ``cce`` (the package's Triton kernels, ``impl="cce"``, its default ``filter_eps``) and
  ``liger`` (Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``) when importable.

Protocol, in one process: a warm-up pass runs every implementation once (first-call costs and
compilation, reported as "first call s", kept out of the rounds). A checked pass runs each once more,
untimed: its loss and gradients against eager's (max rel diff: ``max|x - eager| / max|eager|`` over
the loss, ``dE`` and ``dC``; a row over the tolerance is marked WRONG, so a wrong fast path cannot win)
and its allocation peak: the growth of the bytes held by tensors during fwd+bwd, gradients included
(the allocator's own count through torch's profiler on the CPU, ``max_memory_allocated`` on CUDA).
Then ``--rounds`` interleaved rounds, each running every implementation once, the order rotated by one
per round: time (median over rounds) and the peak footprint growth during fwd+bwd, gradients included
(``tokenpass.runtime.memory.PeakMemory``: on Linux the kernel's resident high-water mark, reset before
the block; ``torch.cuda.max_memory_allocated`` growth on CUDA), median and range over rounds. Freed heap
pages are handed back to the OS (``malloc_trim``) before each block so one implementation's freed
memory cannot hide the next one's; even so the RSS peak of the chunked paths moves by tens of MiB from
run to run with where glibc places their chunks, which is why the allocation peak is reported too.
Ratios are against eager in the same run: time ``x`` (above 1 is slower), memory ``/`` (eager's peak
over this one's: above 1 is smaller).

    .venv/bin/python tools/bench_cce.py --shape smollm2 --rounds 3 --out cce-smollm2.json
    .venv/bin/python tools/bench_cce.py --shape gemma2 --tokens 1024 --rounds 3
    .venv/bin/python tools/bench_cce.py --smoke
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from tokenpass.kernels.linear_cross_entropy_ref import fused_pays_off
from tokenpass.methods.cutcrossentropy import linear_cross_entropy as tokenpass_lce
from tokenpass.runtime.memory import PeakMemory

IGNORE_INDEX = -100
IGNORED_FRACTION = 0.1
MIB = 2**20

# (tokens on the CPU, tokens on CUDA, hidden size, vocabulary)
SHAPES = {
    "smollm2": (8192, 8192, 576, 49152),
    "gemma2": (1024, 8192, 2304, 256000),
    "smoke": (256, 256, 512, 2048),  # tiny; V / D small keeps torch's default chunking to a few chunks, and V
    # keeps tokenpass's fused variant the CPU default
}
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the implementations -------------------------------------------------------------------------


def eager_loss(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((e @ c.T).float(), targets, ignore_index=IGNORE_INDEX)


def torch_lce(options) -> LossFn:
    def run(e, c, targets):
        return F.linear_cross_entropy(e, c, targets, ignore_index=IGNORE_INDEX, options=options)
    return run


def tokenpass_loss(fused: bool | None) -> LossFn:
    def run(e, c, targets):
        return tokenpass_lce(e, c, targets, ignore_index=IGNORE_INDEX, fused=fused)
    return run


def cce_package(impl: str) -> LossFn:
    from cut_cross_entropy import linear_cross_entropy

    def run(e, c, targets):
        return linear_cross_entropy(e, c, targets, ignore_index=IGNORE_INDEX, impl=impl)
    return run


def liger() -> LossFn:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def run(e, c, targets):
        out = loss_fn(c, e, targets)
        return out[0] if isinstance(out, tuple) else out
    return run


@dataclass
class Impl:
    name: str
    make: Callable[[], LossFn]  # may raise ImportError: the row then says why it did not run
    note: str = ""
    cuda_only: bool = False
    compiled: bool = False


def implementations(chunk: int, fused_default: bool, device: torch.device) -> list[Impl]:
    options = torch.nn.LinearCrossEntropyOptions
    variant = ("Triton kernels" if device.type == "cuda" else
               "fused one-pass" if fused_default else "forward + recomputing backward")
    return [
        Impl("eager", lambda: eager_loss, "materialised logits + F.cross_entropy"),
        Impl("torch-compile", lambda: torch.compile(eager_loss), "torch.compile(eager)", compiled=True),
        Impl("torch-lce-ref", lambda: torch_lce(None), "F.linear_cross_entropy, options=None"),
        Impl("torch-lce-chunked", lambda: torch_lce(options()), "F.linear_cross_entropy, LinearCrossEntropyOptions()"),
        Impl(f"torch-lce-chunked-{chunk}", lambda: torch_lce(options(batch_chunk_size=chunk, chunking_method=None)),
             f"F.linear_cross_entropy, batch_chunk_size={chunk}"),
        Impl("tokenpass", lambda: tokenpass_loss(None), f"defaults (picks: {variant})"),
        Impl("tokenpass-fused", lambda: tokenpass_loss(True), "fused=True"),
        Impl("tokenpass-unfused", lambda: tokenpass_loss(False), "fused=False"),
        Impl("cce-torch-compile", lambda: cce_package("torch_compile"), "cut-cross-entropy impl=torch_compile",
             compiled=True),
        Impl("cce", lambda: cce_package("cce"), "cut-cross-entropy impl=cce (Triton)", cuda_only=True),
        Impl("liger", liger, "Liger-Kernel LigerFusedLinearCrossEntropyLoss", cuda_only=True),
    ]


def default_names(impls: list[Impl], fused_default: bool) -> list[str]:
    """Every implementation, less the explicit tokenpass variant the default already is (a duplicate)."""
    duplicate = "tokenpass-fused" if fused_default else "tokenpass-unfused"
    return [impl.name for impl in impls if impl.name != duplicate]


# --- measuring ------------------------------------------------------------------------------------

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so a block's resident growth is its own
    (glibc keeps freed chunks below its mmap threshold resident, and the next block would reuse them
    without the footprint growing)."""
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Sample:
    seconds: float
    peak_bytes: int
    loss: torch.Tensor
    grads: tuple[torch.Tensor, torch.Tensor]


def fwd_bwd(fn: LossFn, e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> Sample:
    """One timed forward + backward; its peak memory growth includes the gradients it leaves."""
    e.grad = c.grad = None
    release_freed_memory()
    with PeakMemory(e.device) as memory:
        start = _clock(e.device)
        loss = fn(e, c, targets)
        loss.backward()
        seconds = _clock(e.device) - start
    grads = (e.grad, c.grad)
    e.grad = c.grad = None
    return Sample(seconds, memory.peak_bytes, loss.detach(), grads)


def max_rel_diff(value: torch.Tensor, reference: torch.Tensor, block: int = 1 << 24) -> float:
    """``max|value - reference| / max|reference|``, in blocks (a gradient can be gigabytes)."""
    diff = scale = 0.0
    for a, b in zip(value.reshape(-1).split(block), reference.reshape(-1).split(block)):
        a, b = a.double(), b.double()
        diff = max(diff, (a - b).abs().max().item())
        scale = max(scale, b.abs().max().item())
    return diff / max(scale, 1e-30)


def check(sample: Sample, reference: Sample) -> float:
    if sample.grads[0] is None or sample.grads[1] is None:
        return math.inf
    pairs = [(sample.loss, reference.loss), *zip(sample.grads, reference.grads)]
    return max(max_rel_diff(a, b) for a, b in pairs)


def _trace_allocation_peak(prof) -> int:
    """Peak growth of the bytes held by CPU tensors over a profile (``profile_memory=True``): the profiler's
    ``[memory]`` events carry the allocator's running total."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = [event for event in json.loads(path.read_text())["traceEvents"]
                  if event.get("name") == "[memory]" and event.get("args", {}).get("Device Type", 0) == 0]
    if not events:
        return 0
    first = min(events, key=lambda event: event["ts"])["args"]
    return max(event["args"]["Total Allocated"] for event in events) - (first["Total Allocated"] - first["Bytes"])


def tracked_fwd_bwd(fn: LossFn, e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> tuple[Sample, int]:
    """``fwd_bwd`` and the peak of its tensor allocations (gradients included): the allocator's own count,
    free of the C library's page keeping. CPU: torch's profiler with ``profile_memory`` (its overhead is
    why this pass is not timed); CUDA: ``max_memory_allocated`` growth, which the timed samples have too."""
    if e.device.type == "cuda":
        sample = fwd_bwd(fn, e, c, targets)
        return sample, sample.peak_bytes
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        sample = fwd_bwd(fn, e, c, targets)
    return sample, _trace_allocation_peak(prof)


@dataclass
class Row:
    impl: Impl
    fn: LossFn | None = None
    status: str = ""  # why it did not run
    first_call_s: float = math.nan
    rel_diff: float = math.nan
    alloc_peak_bytes: int = 0
    seconds: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)


def inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    e = torch.randn(tokens, hidden, generator=generator)
    c = torch.randn(vocab, hidden, generator=generator) / math.sqrt(hidden)  # logits of unit scale
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    ignored = torch.rand(tokens, generator=generator) < IGNORED_FRACTION
    targets[ignored] = IGNORE_INDEX
    e = e.to(device=device, dtype=dtype).requires_grad_()
    c = c.to(device=device, dtype=dtype).requires_grad_()
    return e, c, targets.to(device)


def prepare(rows: list[Row], device: torch.device) -> None:
    for row in rows:
        if row.impl.cuda_only and device.type != "cuda":
            row.status = "CUDA only"
            continue
        try:
            row.fn = row.impl.make()
        except ImportError as error:
            row.status = "not installable here" if "cut_cross_entropy" in str(error) else f"not importable ({error})"


def _failed(row: Row, error: Exception) -> None:
    row.status, row.fn = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}", None
    progress(f"{row.impl.name}: {row.status}")


def warm_up(rows: list[Row], e, c, targets) -> None:
    """Each implementation's first call (compilation, first-touch costs), timed on its own."""
    for row in [row for row in rows if row.fn is not None]:
        progress(f"{row.impl.name}: first call ...")
        try:
            row.first_call_s = fwd_bwd(row.fn, e, c, targets).seconds
        except Exception as error:  # noqa: BLE001 - a peer that fails is reported, not fatal
            _failed(row, error)
            continue
        progress(f"{row.impl.name}: first call {row.first_call_s:.2f} s")


def checked_pass(rows: list[Row], e, c, targets, tolerance: float) -> None:
    """Each implementation once more, untimed: its tensor-allocation peak, and its loss and gradients
    against eager's (eager runs first; its result is held until the others are checked)."""
    reference = None
    for row in [row for row in rows if row.fn is not None]:
        try:
            sample, row.alloc_peak_bytes = tracked_fwd_bwd(row.fn, e, c, targets)
        except Exception as error:  # noqa: BLE001
            _failed(row, error)
            continue
        if reference is None:
            reference = sample
        row.rel_diff = check(sample, reference)
        progress(f"{row.impl.name}: allocated peak +{row.alloc_peak_bytes / MIB:.1f} MiB, max rel diff vs eager "
                 f"{row.rel_diff:.1e}" + ("" if row.rel_diff <= tolerance else "  ** OVER TOLERANCE **"))
        del sample


def measure(rows: list[Row], e, c, targets, rounds: int) -> None:
    running = [row for row in rows if row.fn is not None]
    for r in range(rounds):
        order = running[r % len(running):] + running[: r % len(running)]
        for row in order:
            sample = fwd_bwd(row.fn, e, c, targets)
            row.seconds.append(sample.seconds)
            row.peak_bytes.append(sample.peak_bytes)
            progress(f"round {r + 1}/{rounds} {row.impl.name}: {1000 * sample.seconds:.1f} ms, "
                     f"peak +{sample.peak_bytes / MIB:.1f} MiB")
            del sample


def summarise(rows: list[Row], tolerance: float) -> list[dict]:
    eager = next(row for row in rows if row.impl.name == "eager")
    eager_s, eager_peak = statistics.median(eager.seconds), statistics.median(eager.peak_bytes)
    out = []
    for row in rows:
        entry = {"impl": row.impl.name, "what": row.impl.note, "status": row.status or "ok"}
        if row.seconds:
            median, peak = statistics.median(row.seconds), statistics.median(row.peak_bytes)
            entry.update({
                "ms": 1000 * median, "min_ms": 1000 * min(row.seconds), "max_ms": 1000 * max(row.seconds),
                "samples_ms": [1000 * s for s in row.seconds], "time_vs_eager": median / eager_s,
                "alloc_peak_mib": row.alloc_peak_bytes / MIB,
                "alloc_vs_eager": eager.alloc_peak_bytes / max(row.alloc_peak_bytes, 1),
                "peak_mib": peak / MIB, "min_peak_mib": min(row.peak_bytes) / MIB,
                "max_peak_mib": max(row.peak_bytes) / MIB, "peak_samples_mib": [b / MIB for b in row.peak_bytes],
                "memory_vs_eager": eager_peak / max(peak, 1),
                "first_call_s": row.first_call_s, "compiled": row.impl.compiled,
                "max_rel_diff": row.rel_diff, "agrees": bool(row.rel_diff <= tolerance),
            })
            if not entry["agrees"]:
                entry["status"] = "WRONG (over tolerance)"
        out.append(entry)
    return out


def _alloc_cells(report: dict, row: dict) -> tuple[str, str]:
    """Allocation peak and its ratio to eager's, each also beyond the gradients (which every row holds)."""
    eager = next(r for r in report["rows"] if r["impl"] == "eager")
    beyond, eager_beyond = row["alloc_peak_mib"] - report["grad_mib"], eager["alloc_peak_mib"] - report["grad_mib"]
    return (f"{row['alloc_peak_mib']:.1f} ({beyond:.1f})",
            f"/{row['alloc_vs_eager']:.1f} (/{eager_beyond / max(beyond, 1e-3):.1f})")


def render(report: dict) -> None:
    cuda = report["device"] == "cuda"
    title = (f"LM head + CE fwd+bwd, {report['shape']} N {report['tokens']} D {report['hidden']} V {report['vocab']}, "
             f"{report['dtype']} on {report['device_name']} ({report['threads']} threads), median of "
             f"{report['rounds']} rounds; memory = growth during fwd+bwd incl. {report['grad_mib']:.0f} MiB of "
             "gradients")
    table = Table(title=title)
    for col in ("impl", "ms (median \\[min-max])", "time vs eager", "alloc peak MiB (beyond grads)", "alloc vs eager",
                "RSS peak MiB (median \\[min-max])", "RSS vs eager", "max rel diff", "first call s", "notes"):
        col = col.replace("RSS", "CUDA") if cuda else col  # the rounds' peak: the CUDA allocator's on a GPU
        table.add_column(col, justify="left" if col in ("impl", "notes") else "right")
    for r in report["rows"]:
        if "ms" not in r:
            table.add_row(r["impl"], *["-"] * 8, f"{r['status']}; {r['what']}")
            continue
        notes = r["what"] + ("" if r["status"] == "ok" else f"; {r['status']}")
        peak = f"{r['peak_mib']:.1f} [{r['min_peak_mib']:.0f}-{r['max_peak_mib']:.0f}]"
        table.add_row(r["impl"], f"{r['ms']:.0f} [{r['min_ms']:.0f}-{r['max_ms']:.0f}]", f"{r['time_vs_eager']:.2f}x",
                      *_alloc_cells(report, r), peak, f"/{r['memory_vs_eager']:.1f}", f"{r['max_rel_diff']:.1e}",
                      f"{r['first_call_s']:.1f}" + (" (compile)" if r["compiled"] else ""), notes)
    Console(width=240, file=sys.stdout).print(table)


def markdown(report: dict) -> str:
    """The table as markdown (what docs/benchmarks.md holds)."""
    lines = ["| impl | ms (median [min-max]) | time vs eager | alloc peak MiB (beyond grads) | alloc vs eager | "
             f"{'CUDA' if report['device'] == 'cuda' else 'RSS'} peak MiB (median [min-max]) | vs eager | "
             "max rel diff | first call s | notes |", "|" + "---|" * 10]
    for r in report["rows"]:
        if "ms" not in r:
            lines.append(f"| `{r['impl']}` |" + " - |" * 8 + f" {r['status']}; {r['what']} |")
            continue
        notes = r["what"] + ("" if r["status"] == "ok" else f"; **{r['status']}**")
        lines.append(
            f"| `{r['impl']}` | {r['ms']:.0f} [{r['min_ms']:.0f}-{r['max_ms']:.0f}] | {r['time_vs_eager']:.2f}x | "
            f"{' | '.join(_alloc_cells(report, r))} | "
            f"{r['peak_mib']:.1f} [{r['min_peak_mib']:.0f}-{r['max_peak_mib']:.0f}] | /{r['memory_vs_eager']:.1f} | "
            f"{r['max_rel_diff']:.1e} | {r['first_call_s']:.1f}{' (compile)' if r['compiled'] else ''} | {notes} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2", choices=[s for s in SHAPES if s != "smoke"])
    parser.add_argument("--tokens", type=int, help="N (default: the shape's, 1024 for gemma2 on the CPU)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--impl", nargs="+", help="only these implementations (eager always runs: the reference)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--chunk", type=int, default=256, help="batch_chunk_size of the tuned torch chunked row")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 1 round, every implementation")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table instead")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--render", type=Path, metavar="FILE.json", help="print a saved report's table; run nothing")
    return parser.parse_args(argv)


def show(report: dict, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.markdown:
        print(markdown(report))
    else:
        render(report)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        show(report, args)
        return report
    shape = "smoke" if args.smoke else args.shape
    rounds = 1 if args.smoke else args.rounds
    cpu_tokens, cuda_tokens, hidden, vocab = SHAPES[shape]
    tokens = args.tokens or (cuda_tokens if args.device == "cuda" else cpu_tokens)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tolerance = TOLERANCE[dtype]
    fused_default = device.type != "cuda" and fused_pays_off(vocab)
    impls = implementations(args.chunk, fused_default, device)
    known = {impl.name for impl in impls}
    names = args.impl or default_names(impls, fused_default)
    if unknown := set(names) - known:
        raise SystemExit(f"unknown --impl {sorted(unknown)}; known: {sorted(known)}")
    rows = [Row(impl) for impl in impls if impl.name == "eager" or impl.name in names]
    prepare(rows, device)
    e, c, targets = inputs(tokens, hidden, vocab, dtype, args.device)
    grad_bytes = (e.numel() + c.numel()) * e.element_size()
    progress(f"{shape}: N {tokens} D {hidden} V {vocab} {args.dtype} on {device}; eager's logits alone are "
             f"{tokens * vocab * 4 / MIB:.0f} MiB (fp32), the gradients {grad_bytes / MIB:.0f} MiB")
    gc.collect()
    gc.freeze()  # the objects so far (torch, Inductor) are not garbage: each block's collection skips them
    try:
        warm_up(rows, e, c, targets)
        checked_pass(rows, e, c, targets, tolerance)
        measure(rows, e, c, targets, rounds)
    finally:
        gc.unfreeze()
    report = {
        "shape": shape, "tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": args.dtype,
        "device": args.device, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{platform.machine()} CPU", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "rounds": rounds, "ignored_fraction": IGNORED_FRACTION, "grad_mib": grad_bytes / MIB, "tolerance": tolerance,
        "command": " ".join(["tools/bench_cce.py", *(argv if argv is not None else sys.argv[1:])]),
        "rows": summarise(rows, tolerance),
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    show(report, args)
    return report


if __name__ == "__main__":
    main()
