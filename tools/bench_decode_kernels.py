"""Decode attention kernels on a GPU: tokenpass's Triton kernels against torch SDPA and, where a wheel is
installed, FlashAttention's and FlashInfer's decode kernels, at real model shapes.

One query token per sequence over a KV cache of ``--contexts`` slots, bf16 by default: the shapes of
Llama-3.2-1B (32 query heads, 8 KV heads, head_dim 64) and, with ``--head-dims 64 128``, of 8B-class
models. Each implementation is checked against the exact torch reference first (a kernel that is fast
and wrong is reported as wrong, not timed), then timed with CUDA events in interleaved rounds
(medians). Every time also reads as bandwidth: a decode kernel must read the whole K and V once, so
``bytes / time`` against the GPU's measured read bandwidth (``tools/bandwidth.py``) says how close it
gets to the ceiling. ``triton-sparse`` is TidalDecode's kernel over ``--top-k`` chosen slots (its
bytes: the chosen rows only).

    .venv/bin/python tools/bench_decode_kernels.py --contexts 4096 16384 32768 --batches 1 8 --head-dims 64 128

Without a GPU, ``--smoke`` runs every path once on a tiny shape under ``TRITON_INTERPRET=1`` (a check
that the tool works, no timings; in fp16, as the interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth import read_bandwidth  # noqa: E402

from tokenpass.kernels.cache_attention_ref import cache_attention_reference  # noqa: E402
from tokenpass.kernels.sparse_attention_ref import sparse_attention_reference  # noqa: E402

Kernel = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int

    def kv_bytes(self, dtype: torch.dtype, slots: int | None = None) -> int:
        rows = self.context if slots is None else slots
        return 2 * self.batch * self.kv_heads * rows * self.head_dim * dtype.itemsize


@dataclass
class Row:
    impl: str
    batch: int
    context: int
    head_dim: int
    us: float
    min_us: float
    max_us: float
    gb_per_s: float
    of_bandwidth: float
    max_error: float


def inputs(shape: Shape, dtype: torch.dtype, device: str, top_k: int, seed: int = 0):
    generator = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(shape.batch, shape.heads, 1, shape.head_dim, generator=generator, device=device, dtype=dtype)
    kv = (shape.batch, shape.kv_heads, shape.context, shape.head_dim)
    keys = torch.randn(kv, generator=generator, device=device, dtype=dtype)
    values = torch.randn(kv, generator=generator, device=device, dtype=dtype)
    k = min(top_k, shape.context - 1)
    slots = torch.rand(shape.batch, shape.kv_heads, shape.context - 1, generator=generator, device=device
                       ).topk(k, dim=-1).indices.sort(-1).values
    return q, keys, values, slots


def kernels(q, keys, values, slots, scale: float) -> dict[str, tuple[Kernel, Kernel]]:
    """Name -> (kernel, its exact reference) for every implementation this machine has."""
    from tokenpass.kernels.decode_attention import decode_attention
    from tokenpass.kernels.sparse_decode_attention import sparse_decode_attention

    dense_ref = lambda: cache_attention_reference(q.float(), keys.float(), values.float(), None, scale)  # noqa: E731
    found = {
        "triton": (lambda: decode_attention(q, keys, values, None, scale), dense_ref),
        "sdpa": (lambda: F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=True), dense_ref),
        "triton-sparse": (lambda: sparse_decode_attention(q, keys, values, None, slots, scale),
                          lambda: sparse_attention_reference(q.float(), keys.float(), values.float(), None, slots,
                                                             scale)),
    }
    try:
        from flash_attn import flash_attn_with_kvcache

        qf, kf, vf = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)  # [B, S, H, D] views
        found["flash-attn"] = (lambda: flash_attn_with_kvcache(qf, kf.contiguous(), vf.contiguous(),
                                                               softmax_scale=scale).transpose(1, 2), dense_ref)
    except ImportError:
        pass
    try:
        import flashinfer

        if q.shape[0] == 1:
            found["flashinfer"] = (lambda: flashinfer.single_decode_with_kv_cache(
                q[0, :, 0], keys[0], values[0], kv_layout="HND", sm_scale=scale)[None, :, None], dense_ref)
    except ImportError:
        pass
    return found


def time_us(kernel: Kernel, reps: int) -> float:
    """Mean microseconds of ``reps`` back-to-back calls, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        kernel()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / reps


def bench_shape(shape: Shape, dtype: torch.dtype, device: str, top_k: int, rounds: int, reps: int,
                bandwidth: float | None) -> list[Row]:
    q, keys, values, slots = inputs(shape, dtype, device, top_k)
    found = kernels(q, keys, values, slots, shape.head_dim ** -0.5)
    errors = {name: float((kernel().float() - ref()).abs().max()) for name, (kernel, ref) in found.items()}
    if device != "cuda":
        return [Row(name, shape.batch, shape.context, shape.head_dim, 0, 0, 0, 0, 0, errors[name]) for name in found]
    for kernel, _ in found.values():  # compile and warm up outside the timed rounds
        kernel()
    samples: dict[str, list[float]] = {name: [] for name in found}
    for _ in range(rounds):
        for name, (kernel, _) in found.items():
            samples[name].append(time_us(kernel, reps))
    rows = []
    for name, values_us in samples.items():
        us = statistics.median(values_us)
        read = shape.kv_bytes(dtype, slots.shape[-1] + 1 if name == "triton-sparse" else None)
        rate = read / (us * 1e-6)
        rows.append(Row(name, shape.batch, shape.context, shape.head_dim, us, min(values_us), max(values_us),
                        rate / 1e9, rate / bandwidth if bandwidth else 0.0, errors[name]))
    return rows


def render(rows: list[Row], bandwidth: float | None) -> None:
    print(f"read bandwidth: {bandwidth / 1e9:.0f} GB/s" if bandwidth else "no timings (smoke run)")
    print("| impl | batch | context | head_dim | us (median [min-max]) | GB/s | of bandwidth | max error |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r.impl} | {r.batch} | {r.context} | {r.head_dim} | {r.us:.1f} [{r.min_us:.1f}-{r.max_us:.1f}] | "
              f"{r.gb_per_s:.0f} | {100 * r.of_bandwidth:.0f}% | {r.max_error:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2048, help="slots the sparse kernel reads")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="no GPU: one tiny shape under the Triton interpreter")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON to this file")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
        device, bandwidth = "cpu", None
        shapes = [Shape(1, 4, 2, 16, 200)]
        if dtype == torch.bfloat16:  # the interpreter's tl.dot on bf16 returns garbage (numpy has no bf16)
            print("smoke: bf16 tl.dot is wrong in the Triton interpreter (a 16x16 product is off by 1e10); "
                  "using float16", file=sys.stderr)
            dtype = torch.float16
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: this benchmark times GPU kernels (use --smoke to check the tool on CPU)")
        device, bandwidth = "cuda", read_bandwidth("cuda", gib=4.0)
        shapes = [Shape(b, args.heads, args.kv_heads, d, s) for d in args.head_dims for s in args.contexts
                  for b in args.batches]
    rows = [row for shape in shapes for row in bench_shape(shape, dtype, device, args.top_k, args.rounds, args.reps,
                                                           bandwidth)]
    render(rows, bandwidth)
    if args.out:
        args.out.write_text(json.dumps({"bandwidth_bytes_per_s": bandwidth, "device": device, "dtype": args.dtype,
                                        "rows": [asdict(r) for r in rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
