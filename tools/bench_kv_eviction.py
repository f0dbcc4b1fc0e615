"""KV eviction on SmolLM2 (Keyformer, H2O, StreamingLLM): quality at several budgets, decode speed at a
long context, and memory over a long generation.

    python tools/bench_kv_eviction.py quality [--context 4096] [--continuation 256] [--budgets 0.1,0.25,0.5]
    python tools/bench_kv_eviction.py speed [--context 8000] [--tokens 32] [--rounds 3] [--budget 0.25]
    python tools/bench_kv_eviction.py memory [--budget 512] [--new-tokens 4096]
    python tools/bench_kv_eviction.py tokens -o ids.pt     # the quality tokens, for tools/bench_kvpress.py

Quality follows the ``tokenpass bench`` protocol: prefill ``--context`` tokens of the default corpus
(licence texts), then teacher-force the ``--continuation`` that follows, one decode step at a time, and
compare every next-token distribution with the dense model's (perplexity ratio, top-1 agreement, KL).
Budgets are fractions of the prompt. Each result is printed as a JSON line as soon as it exists.

Speed rounds are interleaved (every configuration once per round) and reported as medians against the
dense runtime measured in the same rounds, after one prefill per configuration; the prompt is random
ids (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import tokenpass
from tokenpass.api import capture, fork, optimize_graphs
from tokenpass.bench import compare, teacher_forced
from tokenpass.models import load_tokenizer
from tokenpass.texts import read_text, token_ids

METHODS = ("keyformer", "h2o", "streamingllm")


def _emit(row: dict) -> dict:
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def quality(args) -> dict:
    ids = torch.tensor(token_ids(load_tokenizer(), read_text(), args.context + args.continuation))
    prompt, cont = ids[: args.context].view(1, -1), ids[args.context :]
    captured = capture(tokenpass.load("smollm2"))
    dense = teacher_forced(optimize_graphs(fork(captured), []), prompt, cont, "dense")
    rows = []
    for budget in args.budgets:
        for method in args.methods:
            optimized = optimize_graphs(fork(captured), [f"{method}:kv_budget={budget}"])
            run = teacher_forced(optimized, prompt, cont, f"{method} {budget:.0%}")
            figures = compare(run, dense, cont, args.context)
            rows.append(_emit({"method": method, "budget": budget, "kv_bytes_ratio": run.kv_bytes / dense.kv_bytes,
                               **{k: figures[k] for k in ("ppl_ratio", "top1_agreement", "kl")}}))
    return {"context": args.context, "continuation": args.continuation, "dense_ppl": compare(dense, dense, cont,
                                                                                               args.context)["ppl"],
            "rows": rows}


def _prefilled(optimized, ids: torch.Tensor, context: int):
    """A session holding ``ids[:, :context]`` (a long prefill is paid once per configuration)."""
    session = optimized.session(1, capacity=ids.shape[1])
    with torch.no_grad():
        session.step(ids[:, :context], torch.ones_like(ids[:, :context]), torch.arange(context)[None], last_only=True)
    return session


def decode_seconds(session, ids: torch.Tensor, start: int, tokens: int) -> float:
    """Seconds to decode ``ids[:, start : start + tokens]`` one token per step on ``session``."""
    one = torch.ones((1, 1), dtype=torch.long)
    with torch.no_grad():
        begin = time.perf_counter()
        for i in range(start, start + tokens):
            session.step(ids[:, i : i + 1], one, torch.full((1, 1), i))
        return time.perf_counter() - begin


def speed(args) -> dict:
    """Each configuration prefills once; rounds then decode ``--tokens`` more on every configuration in
    turn, so all of them see the same context lengths (it grows by ``tokens`` a round)."""
    captured = capture(tokenpass.load("smollm2"))
    configs = {"dense": optimize_graphs(fork(captured), [])}
    for method in args.methods:  # a name, or a pass spec with options ("keyformer:evict_interval=16")
        spec = method if "kv_budget" in method else f"{method}:kv_budget={args.budget}"
        configs[spec] = optimize_graphs(fork(captured), [spec])
    ids = torch.randint(3, 40000, (1, args.context + args.tokens * args.rounds),
                        generator=torch.Generator().manual_seed(0))
    sessions = {name: _prefilled(optimized, ids, args.context) for name, optimized in configs.items()}
    times: dict[str, list[float]] = {name: [] for name in configs}
    for round_ in range(args.rounds):
        for name, session in sessions.items():
            times[name].append(decode_seconds(session, ids, args.context + round_ * args.tokens, args.tokens))
            _emit({"round": round_, "config": name, "decode_s": times[name][-1],
                   "kv_bytes": session.cache.nbytes()})
    dense = statistics.median(times["dense"])
    rows = [{"config": name, "decode_tokens_per_s": args.tokens / statistics.median(t),
             "speedup": dense / statistics.median(t), "rounds_s": t} for name, t in times.items()]
    return {"context": args.context, "tokens": args.tokens, "threads": torch.get_num_threads(), "rows": rows}


def memory(args) -> dict:
    """Cache bytes every ``--every`` steps of a long generation under an absolute budget (flat = bounded)."""
    model = tokenpass.load("smollm2")
    optimized = tokenpass.optimize(model, [f"{args.methods[0]}:kv_budget={int(args.budget)}"])
    prompt = torch.tensor(token_ids(load_tokenizer(), read_text(), args.prompt)).view(1, -1)
    session = optimized.session(1, capacity=args.prompt + args.new_tokens)
    samples = []
    with torch.no_grad():
        logits = session.step(prompt, torch.ones_like(prompt), torch.arange(args.prompt)[None], last_only=True)
        for i in range(args.new_tokens):
            token = logits[:, -1:].argmax(-1)
            logits = session.step(token, torch.ones_like(token), torch.full((1, 1), args.prompt + i))
            if (i + 1) % args.every == 0:
                samples.append(_emit({"new_tokens": i + 1, "kv_bytes": session.cache.nbytes(),
                                      "live_slots": session.cache.live_tokens()}))
    return {"method": args.methods[0], "budget": int(args.budget), "prompt": args.prompt, "samples": samples}


def tokens(args) -> dict:
    """Save the quality protocol's token ids (context + continuation) for ``tools/bench_kvpress.py``."""
    ids = torch.tensor(token_ids(load_tokenizer(), read_text(), args.context + args.continuation))
    torch.save({"ids": ids, "context": args.context}, args.output)
    return {"saved": args.output, "context": args.context, "continuation": args.continuation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["quality", "speed", "memory", "tokens"])
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.25, 0.5])
    parser.add_argument("--budget", type=float, default=0.25, help="speed: fraction; memory: tokens")
    parser.add_argument("--context", type=int, default=None, help="quality: 4096, speed: 8000")
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32, help="speed: decode steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=128, help="memory: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=4096)
    parser.add_argument("--every", type=int, default=256)
    parser.add_argument("-o", "--output", default="kv_eviction_ids.pt", help="tokens: where to save them")
    args = parser.parse_args()
    if args.context is None:
        args.context = 8000 if args.mode == "speed" else 4096  # SmolLM2 has 8192 positions
    if args.mode == "memory" and args.budget < 1:
        args.budget = 512
    result = {"quality": quality, "speed": speed, "memory": memory, "tokens": tokens}[args.mode](args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
