"""Runtime decode speed with no passes against transformers' own ``generate`` on the same machine.

Greedy decoding of N tokens after a context of C tokens of real text, batch 1; prefill excluded from
the per-token figures (each side's prefill is timed separately). Prints a table and, with --json, JSON.

    .venv/bin/python tools/bench_runtime.py --contexts 512 4096 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from rich.console import Console
from rich.table import Table

import tokenpass
from tokenpass.models import load_tokenizer
from tokenpass.runtime.generate import Sampling, generate_tokens
from tokenpass.texts import read_text, token_ids


class _Timed:
    """Wraps a step function and records the time of the first call (prefill) and the rest (decode)."""

    def __init__(self, step):
        self.step, self.times = step, []

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.step(*args, **kwargs)
        self.times.append(time.perf_counter() - start)
        return out


def time_tokenpass(optimized, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    session = optimized.session(1, prompt.shape[1] + new_tokens)
    timed = _Timed(session.step)
    out = generate_tokens(type("S", (), {"step": timed})(), prompt, torch.ones_like(prompt), new_tokens, Sampling())
    return timed.times[0], sum(timed.times[1:]) / len(timed.times[1:]), out


def time_hf(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    times = []
    handle = model.register_forward_pre_hook(lambda *a: times.append(time.perf_counter()))
    try:
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False)
        end = time.perf_counter()
    finally:
        handle.remove()
    steps = [b - a for a, b in zip(times, times[1:] + [end])]
    return steps[0], sum(steps[1:]) / len(steps[1:]), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = tokenpass.load("smollm2")
    optimized = tokenpass.optimize(model, name="smollm2")
    ids = token_ids(load_tokenizer("smollm2"), read_text(), max(args.contexts))
    rows = []
    for context in args.contexts:
        prompt = torch.tensor([ids[:context]])
        time_tokenpass(optimized, prompt[:, :16], 2)  # warm-up
        time_hf(model, prompt[:, :16], 2)
        hf_prefill, hf_decode, hf_out = time_hf(model, prompt, args.new_tokens)
        tp_prefill, tp_decode, tp_out = time_tokenpass(optimized, prompt, args.new_tokens)
        rows.append({
            "context": context, "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
            "hf_decode_ms": 1000 * hf_decode, "tokenpass_decode_ms": 1000 * tp_decode,
            "decode_speedup_vs_hf": hf_decode / tp_decode, "hf_prefill_s": hf_prefill, "tokenpass_prefill_s": tp_prefill,
            "same_tokens": bool(torch.equal(hf_out, tp_out)),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="SmolLM2 greedy decode: tokenpass runtime (no passes) vs transformers generate")
    for col in ("context", "HF ms/token", "tokenpass ms/token", "speed-up vs HF", "HF prefill s",
                "tokenpass prefill s", "same tokens"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["context"]), f"{r['hf_decode_ms']:.1f}", f"{r['tokenpass_decode_ms']:.1f}",
                      f"{r['decode_speedup_vs_hf']:.2f}x", f"{r['hf_prefill_s']:.2f}", f"{r['tokenpass_prefill_s']:.2f}",
                      str(r["same_tokens"]))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
