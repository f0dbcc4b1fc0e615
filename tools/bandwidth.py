"""The memory-bandwidth ceiling of a decode step: what the machine can read per second, and what a step
must read (every weight once, plus the live KV cache), so that a measured ms/token also reads as a
fraction of the fastest any implementation could go on this machine.

    .venv/bin/python tools/bandwidth.py --context 512 4096 --batch 1

Bandwidth is measured as the median of several full reads of a buffer much larger than the last-level
cache (``torch.sum`` over it, with the threads torch uses), which is how a decode step reads its
weights: once, streaming, with little reuse. On CUDA the same read runs on the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


def read_bandwidth(device: str = "cpu", gib: float = 1.0, rounds: int = 7) -> float:
    """Median bytes per second of a full streaming read of a ``gib`` GiB fp32 buffer."""
    buffer = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    buffer.sum()  # first touch: page faults are not bandwidth
    times = []
    for _ in range(rounds):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        buffer.sum()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return buffer.numel() * 4 / statistics.median(times)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer tensor, each storage counted once (tied embeddings once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def kv_bytes(model: nn.Module, context: int, batch: int = 1) -> int:
    """Bytes of keys and values a decode step at ``context`` tokens reads (every layer, every KV head)."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * heads * head_dim * context * batch * element


def ceiling_ms(model: nn.Module, context: int, bandwidth: float, batch: int = 1) -> float:
    """The least time one decode step can take if it only had to read its bytes at ``bandwidth``."""
    return 1000 * (weight_bytes(model) + kv_bytes(model, context, batch)) / bandwidth


def main() -> None:
    import tokenpass

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    model = tokenpass.load("smollm2")
    bandwidth = read_bandwidth()
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s ({torch.get_num_threads()} threads); "
          f"weights: {weight_bytes(model) / 1e6:.0f} MB")
    for context in args.context:
        kv = kv_bytes(model, context, args.batch)
        print(f"context {context}: KV {kv / 1e6:.1f} MB, ceiling {ceiling_ms(model, context, bandwidth, args.batch):.1f} "
              "ms/token")


if __name__ == "__main__":
    main()
