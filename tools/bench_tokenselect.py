"""TokenSelect on SmolLM2: quality at a long context, the selection cache's hit rate, and attention time.

    python tools/bench_tokenselect.py quality [--context 4096] [--continuation 256] [--thetas none,0.9]
                                              [--positions original,contiguous]
    python tools/bench_tokenselect.py attention [--context 8000] [--tokens 16] [--thetas none,0.9]

Quality follows the ``tokenpass bench`` protocol (teacher-forced continuation of the default corpus,
against the dense runtime) and adds the selection cache's hit rate over those decode steps. Attention
time is what the profiler charges to each step's attention ops (``cached_attention`` for dense,
``token_select_attention`` for TokenSelect: scoring, selection and the sparse read included), summed
over the layers, per decode step, after one prefill per configuration; the rest of the step is the same
in both. Attention mode also times whole decode steps by the wall clock, without the profiler,
interleaved with the profiled ones: the rest of the step being the same, a step shorter than dense's
means attention cheaper than dense's, with no profiler cost in the comparison.

Quality also reports each configuration's own perplexity, which is what a context longer than the
model's positions (8192 for SmolLM2) puts to the test: there dense attention meets distances it was
never trained on, and ``positions=contiguous`` never does.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import tokenpass
from tokenpass.api import capture, fork, optimize_graphs
from tokenpass.methods.tokenselect import HITS, LOOKUPS
from tokenpass.models import load_tokenizer
from tokenpass.texts import read_text, token_ids

from bench_kv_eviction import decode_seconds  # tools/ is the script's directory: on sys.path

ATTENTION_OPS = ("tokenpass::cached_attention", "tokenpass::token_select_attention")


def _spec(theta: str, top_k: int, positions: str = "original") -> str:
    return f"tokenselect:top_k={top_k}:theta={theta}:positions={positions}"


def _forced(optimized, prompt: torch.Tensor, cont: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Teacher-forced log-probabilities ``[M, V]`` and the session's cache notes."""
    session = optimized.session(1, capacity=prompt.shape[1] + len(cont))
    one = torch.ones((1, 1), dtype=torch.long)
    with torch.no_grad():
        logits = session.step(prompt, torch.ones_like(prompt), torch.arange(prompt.shape[1])[None], last_only=True)
        rows = [logits[0, -1].float().log_softmax(-1)]
        for i in range(len(cont) - 1):
            logits = session.step(cont[i].view(1, 1), one, torch.tensor([[prompt.shape[1] + i]]))
            rows.append(logits[0, -1].float().log_softmax(-1))
    return torch.stack(rows), session.cache.notes


def quality(args) -> dict:
    ids = torch.tensor(token_ids(load_tokenizer(), read_text(), args.start + args.context + args.continuation))
    prompt, cont = ids[args.start : args.start + args.context].view(1, -1), ids[args.start + args.context :]
    captured = capture(tokenpass.load("smollm2"))
    dense, _ = _forced(optimize_graphs(fork(captured), []), prompt, cont)
    base = -dense.gather(1, cont[:, None]).mean().item()
    print(json.dumps({"dense_ppl": math.exp(base)}), file=sys.stderr, flush=True)
    rows = []
    for theta, positions in [(t, p) for p in args.positions for t in args.thetas]:
        spec = _spec(theta, args.top_k, positions)
        logprobs, notes = _forced(optimize_graphs(fork(captured), [spec]), prompt, cont)
        nll = -logprobs.gather(1, cont[:, None]).mean().item()
        kl = torch.nn.functional.kl_div(logprobs, dense, log_target=True, reduction="batchmean").item()
        row = {"theta": theta, "positions": positions, "top_k": args.top_k, "ppl": math.exp(nll),
               "ppl_ratio": math.exp(nll - base),
               "top1_agreement": (logprobs.argmax(1) == dense.argmax(1)).float().mean().item(), "kl": kl,
               "selection_cache_hit_rate": notes.get(HITS, 0) / max(1, notes.get(LOOKUPS, 0))}
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return {"context": args.context, "start": args.start, "continuation": args.continuation,
            "dense_ppl": math.exp(base), "rows": rows}


def _attention_ms(session, ids: torch.Tensor, start: int, tokens: int) -> float:
    """Milliseconds per decode step the profiler charges to attention ops."""
    one = torch.ones((1, 1), dtype=torch.long)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(start, start + tokens):
            session.step(ids[:, i : i + 1], one, torch.full((1, 1), i))
    total_us = sum(e.cpu_time_total for e in prof.key_averages() if e.key in ATTENTION_OPS)
    return total_us / 1000 / tokens


def attention(args) -> dict:
    captured = capture(tokenpass.load("smollm2"))
    configs = {"dense": optimize_graphs(fork(captured), [])}
    for theta in args.thetas:
        configs[_spec(theta, args.top_k)] = optimize_graphs(fork(captured), [_spec(theta, args.top_k)])
    ids = torch.randint(3, 40000, (1, args.context + 2 * args.tokens * args.rounds),
                        generator=torch.Generator().manual_seed(0))
    sessions = {}
    for name, optimized in configs.items():
        sessions[name] = optimized.session(1, capacity=ids.shape[1])
        with torch.no_grad():
            sessions[name].step(ids[:, : args.context], torch.ones_like(ids[:, : args.context]),
                                torch.arange(args.context)[None], last_only=True)
    times: dict[str, list[float]] = {name: [] for name in configs}
    steps: dict[str, list[float]] = {name: [] for name in configs}
    for round_ in range(args.rounds):
        for name, session in sessions.items():
            start = args.context + 2 * round_ * args.tokens
            steps[name].append(decode_seconds(session, ids, start, args.tokens) * 1000 / args.tokens)
            times[name].append(_attention_ms(session, ids, start + args.tokens, args.tokens))
            print(json.dumps({"round": round_, "config": name, "step_ms": steps[name][-1],
                              "attention_ms_per_step": times[name][-1]}), file=sys.stderr, flush=True)
    dense, dense_step = statistics.median(times["dense"]), statistics.median(steps["dense"])
    rows = [{"config": name, "attention_ms_per_step": statistics.median(t),
             "vs_dense": statistics.median(t) / dense, "step_ms": statistics.median(steps[name]),
             "step_minus_dense_ms": statistics.median(steps[name]) - dense_step,
             "hit_rate": sessions[name].cache.notes.get(HITS, 0) / max(1, sessions[name].cache.notes.get(LOOKUPS, 0))}
            for name, t in times.items()]
    return {"context": args.context, "tokens": args.tokens, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["quality", "attention"])
    parser.add_argument("--thetas", type=lambda s: s.split(","), default=["none", "0.9"])
    parser.add_argument("--positions", type=lambda s: s.split(","), default=["original"],
                        help="quality: TokenSelect's position conventions to run (original, contiguous)")
    parser.add_argument("--top-k", type=int, default=512)
    parser.add_argument("--context", type=int, default=None, help="quality: 4096, attention: 8000")
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--start", type=int, default=0,
                        help="quality: the corpus token the prompt starts at (same continuation, shorter context)")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.context is None:
        args.context = 8000 if args.mode == "attention" else 4096
    print(json.dumps({"quality": quality, "attention": attention}[args.mode](args), indent=1))


if __name__ == "__main__":
    main()
