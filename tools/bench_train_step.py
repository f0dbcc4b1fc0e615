"""A whole training step (forward + backward) with and without the cutcrossentropy pass, on a real model.

``tools/bench_cce.py`` times the head + loss alone; this measures what a user training the model sees:
HF's own training forward, the captured train step as it is, and the captured step after
``cutcrossentropy``. Interleaved rounds, medians; peak memory is the growth over the step's starting
footprint (RSS high-water mark on CPU, the allocator's on CUDA), gradients included. Each variant's loss
is checked against HF's so a wrong fast path cannot win.

    .venv/bin/python tools/bench_train_step.py --batch 4 --tokens 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

import tokenpass
from tokenpass.runtime.memory import PeakMemory

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (real weights) or a tiny family")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


def load(name: str) -> torch.nn.Module:
    return tokenpass.load(name) if name == "smollm2" else tokenpass.tiny(name)


def variants(model: torch.nn.Module) -> dict[str, Step]:
    """name -> a function running one forward and returning the loss (backward done by the caller)."""
    plain = tokenpass.optimize(model, phases=["train"])
    fused = tokenpass.optimize(model, passes=[tokenpass.CutCrossEntropy()], phases=["train"])

    def hf(ids, mask, labels):
        model.train()
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    return {
        "HF forward (train mode)": hf,
        "tokenpass train step": lambda ids, mask, labels: plain(ids, mask, labels=labels).loss,
        "tokenpass + cutcrossentropy": lambda ids, mask, labels: fused(ids, mask, labels=labels).loss,
    }


def run_once(step: Step, batch: tuple[torch.Tensor, ...], model: torch.nn.Module) -> tuple[float, int, float]:
    """(seconds, peak bytes, loss) of one forward + backward, gradients cleared before."""
    model.zero_grad(set_to_none=True)
    with PeakMemory() as memory:
        start = time.perf_counter()
        loss = step(*batch)
        loss.backward()
        seconds = time.perf_counter() - start
    return seconds, memory.peak_bytes, loss.item()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model = load(args.model)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.tokens))
    mask = torch.ones_like(ids)
    batch = (ids, mask, ids.clone())
    steps = variants(model)
    results: dict[str, list[tuple[float, int, float]]] = {name: [] for name in steps}
    for round_ in range(args.rounds):
        names = list(steps)[round_ % len(steps):] + list(steps)[: round_ % len(steps)]
        for name in names:
            results[name].append(run_once(steps[name], batch, model))
            print(f"round {round_ + 1}/{args.rounds} {name}: {results[name][-1][0]:.2f} s", file=sys.stderr)
    report(results, args)


def report(results: dict[str, list[tuple[float, int, float]]], args: argparse.Namespace) -> None:
    base_name = next(iter(results))
    base_time = statistics.median(r[0] for r in results[base_name])
    base_peak = statistics.median(r[1] for r in results[base_name])
    base_loss = results[base_name][0][2]
    print(f"\n{args.model}, batch {args.batch} x {args.tokens} tokens, forward + backward, medians of {args.rounds}")
    print("| step | time (s) | vs HF | peak memory growth (MiB) | vs HF | loss - HF's |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        seconds = statistics.median(r[0] for r in runs)
        peak = statistics.median(r[1] for r in runs)
        print(f"| {name} | {seconds:.2f} | {seconds / base_time:.2f}x | {peak / 2**20:.0f} | "
              f"{peak / base_peak:.2f}x | {runs[0][2] - base_loss:+.1e} |")


if __name__ == "__main__":
    main()
