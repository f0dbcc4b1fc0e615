"""tokenpass's runtime (no method pass) against the fastest ways a user would run the same model with
transformers, timed the same way on both sides, in one process.

Each configuration generates greedily from the same prompt of real text; the whole ``generate`` call is
timed (prefill, every decode step, sampling and appends included). Decode ms/token is the difference
between a run of ``--new-tokens`` tokens and a run of one token, divided by the extra tokens, so prefill
cancels out. Rounds are interleaved (every configuration once per round) and medians are reported with
their range. Peers:

* ``hf-dynamic``: ``model.generate`` with its default dynamic cache;
* ``hf-static``: ``cache_implementation="static"`` (a preallocated cache, HF's documented fast path);
* ``hf-static-compiled``: static cache plus ``torch.compile`` of the forward (``--compile-hf``; slow to
  compile on a small CPU, so off by default);
* ``tokenpass``: ``tokenpass.optimize(model)`` (no method pass).

Every speed is also given as a fraction of the bandwidth ceiling (``tools/bandwidth.py``): the time a
step would take if it only had to stream its weights and live KV cache at the measured read bandwidth.

    .venv/bin/python tools/bench_runtime.py --contexts 512 4096 --batches 1 --new-tokens 32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth import ceiling_ms, read_bandwidth  # noqa: E402

import tokenpass  # noqa: E402
from tokenpass.models import load_tokenizer  # noqa: E402
from tokenpass.texts import read_text, token_ids  # noqa: E402

Generate = Callable[[torch.Tensor, int], torch.Tensor]


def hf_generate(model, **options) -> Generate:
    def run(prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, **options)
    return run


def tokenpass_generate(optimized) -> Generate:
    return lambda prompt, new_tokens: optimized.generate(prompt, max_new_tokens=new_tokens)


def peers(model, compile_hf: bool) -> dict[str, Generate]:
    configs = {"hf-dynamic": hf_generate(model), "hf-static": hf_generate(model, cache_implementation="static"),
               "tokenpass": tokenpass_generate(tokenpass.optimize(model, name="smollm2"))}
    if compile_hf:
        compiled = torch.compile(model.forward)
        configs["hf-static-compiled"] = _with_forward(model, compiled, hf_generate(model, cache_implementation="static"))
    return configs


def _with_forward(model, forward, run: Generate) -> Generate:
    """``run`` with ``model.forward`` swapped for ``forward`` for the duration of each call."""
    def wrapped(prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        original = model.forward
        model.forward = forward
        try:
            return run(prompt, new_tokens)
        finally:
            model.forward = original
    return wrapped


def timed(run: Generate, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = run(prompt, new_tokens)
    return time.perf_counter() - start, out


def measure(configs: dict[str, Generate], prompt: torch.Tensor, new_tokens: int, rounds: int) -> dict[str, dict]:
    """Interleaved rounds; per config the decode ms/token samples and the tokens of the last run."""
    for run in configs.values():  # warm-up (first-call costs, compilation) outside the timed rounds
        run(prompt[:, :16], 2)
        run(prompt, 2)
    samples: dict[str, list[float]] = {name: [] for name in configs}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(rounds):
        for name, run in configs.items():
            short, _ = timed(run, prompt, 1)
            long, outputs[name] = timed(run, prompt, new_tokens)
            samples[name].append(1000 * (long - short) / (new_tokens - 1))
    return {name: {"samples": values, "tokens": outputs[name]} for name, values in samples.items()}


def summarise(results: dict[str, dict], context: int, batch: int, new_tokens: int, ceiling: float) -> list[dict]:
    fastest_hf = min(statistics.median(r["samples"]) for name, r in results.items() if name.startswith("hf"))
    reference = results["hf-dynamic"]["tokens"]
    rows = []
    for name, r in results.items():
        median = statistics.median(r["samples"])
        rows.append({
            "config": name, "context": context, "batch": batch, "new_tokens": new_tokens,
            "decode_ms": median, "min_ms": min(r["samples"]), "max_ms": max(r["samples"]),
            "tokens_per_s": 1000 * batch / median, "vs_fastest_hf": fastest_hf / median,
            "ceiling_ms": ceiling, "of_ceiling": ceiling / median,
            "same_tokens_as_hf": bool(torch.equal(r["tokens"], reference)),
        })
    return rows


def render(rows: list[dict], bandwidth: float) -> None:
    table = Table(title=f"SmolLM2 greedy generate, decode ms/token (median \\[min-max]); read bandwidth "
                        f"{bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} threads")
    for col in ("context", "batch", "config", "ms/token", "tokens/s", "vs fastest HF", "of ceiling", "same tokens"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["context"]), str(r["batch"]), r["config"],
                      f"{r['decode_ms']:.1f} [{r['min_ms']:.1f}-{r['max_ms']:.1f}]", f"{r['tokens_per_s']:.1f}",
                      f"{r['vs_fastest_hf']:.2f}x", f"{100 * r['of_ceiling']:.0f}%", str(r["same_tokens_as_hf"]))
    Console(width=170).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile-hf", action="store_true", help="add HF static cache + torch.compile")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = tokenpass.load("smollm2")
    configs = peers(model, args.compile_hf)
    ids = token_ids(load_tokenizer("smollm2"), read_text(), max(args.contexts) + max(args.batches))
    bandwidth = read_bandwidth()
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            prompt = torch.tensor([ids[i : i + context] for i in range(batch)])
            results = measure(configs, prompt, args.new_tokens, args.rounds)
            rows += summarise(results, context, batch, args.new_tokens, ceiling_ms(model, context, bandwidth, batch))
    if args.json:
        print(json.dumps({"bandwidth_bytes_per_s": bandwidth, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    else:
        render(rows, bandwidth)


if __name__ == "__main__":
    main()
