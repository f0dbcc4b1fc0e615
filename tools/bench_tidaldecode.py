"""TidalDecode on SmolLM2: quality (teacher-forced, real text) and decode speed across a sweep.

    .venv/bin/python tools/bench_tidaldecode.py --context 4096 --continuation 256 --top-k 128 256 512 1024 \
        --sets paper every4 every2 all --json-out docs/tidaldecode_sweep.json

Selection-layer sets: ``paper`` = {2, 13} with dense selection layers (the paper's re-selection layer is
13 of 32, 12 of 30 by fraction; the calibration used 13); ``everyN`` = every N-th layer from 2 and ``all``
= every layer from 2, whose selection layers attend over their own selection (``sparse_selection_output``:
scoring reads all keys, but values only at the selected slots).
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

NUM_LAYERS, SPARSE_START = 30, 2


def selection_set(name: str) -> list[int]:
    if name == "paper":
        return [SPARSE_START, 13]
    if name == "all":
        return list(range(SPARSE_START, NUM_LAYERS))
    if name.startswith("every"):
        return list(range(SPARSE_START, NUM_LAYERS, int(name[5:])))
    raise SystemExit(f"unknown selection set {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--top-k", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--sets", nargs="+", default=["paper"])
    parser.add_argument("--per-kv-head", action="store_true")
    parser.add_argument("--greedy", type=int, default=0)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    configs = {}
    for set_name in args.sets:
        for k in args.top_k:
            spec = f"tidaldecode:top_k={k}:selection_layers={'/'.join(map(str, selection_set(set_name)))}"
            if args.per_kv_head:
                spec += ":per_kv_head=true"
            if set_name != "paper":
                spec += ":sparse_selection_output=true"
            configs[f"{set_name} k={k}"] = [spec]
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
