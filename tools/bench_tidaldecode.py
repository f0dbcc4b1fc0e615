"""TidalDecode on SmolLM2: quality (teacher-forced, real text) and decode speed across a sweep.

    .venv/bin/python tools/bench_tidaldecode.py --context 4096 --continuation 256 --top-k 256 512 1024 \
        --sets paper every4 every2 all --json-out sweep.json

Selection-layer sets (``tidaldecode``'s ``selection_layers`` names): ``paper`` = {2, 12} for 30 layers,
run in the paper's form (selection per query head, dense selection layers); ``everyN`` and ``all`` run
in the tuned form (one selection per KV head, selection layers attend over their own selection:
ranking reads a quarter of the channels of every key, attention only the selected slots).
``--per-query-head`` switches the tuned sets to per-query-head selection.
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console

import tokenpass
from tokenpass.bench import bench
from tokenpass.bench_report import render_bench
from tokenpass.models import load_tokenizer
from tokenpass.texts import read_text, token_ids

PAPER_FORM = ":per_kv_head=false:sparse_selection_output=false"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--top-k", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--sets", nargs="+", default=["paper"])
    parser.add_argument("--per-query-head", action="store_true")
    parser.add_argument("--greedy", type=int, default=0)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    configs = {}
    for name in args.sets:
        for k in args.top_k:
            spec = f"tidaldecode:top_k={k}:selection_layers={name}"
            if name == "paper":
                spec += PAPER_FORM
            elif args.per_query_head:
                spec += ":per_kv_head=false"
            configs[f"{name} k={k}"] = [spec]
    model = tokenpass.load("smollm2")
    ids = token_ids(load_tokenizer("smollm2"), read_text(), args.context + args.continuation)
    report = bench(model, configs, token_ids=ids, context=args.context, continuation=args.continuation,
                   greedy_tokens=args.greedy, name="smollm2")
    render_bench(report, Console(width=200))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
