"""The main demo: SmolLM2-135M-Instruct, the passes tokenpass has, one table with and without them.

Run from a fresh machine with ``bash tools/setup.sh && .venv/bin/python tools/demo.py``.
"""

from __future__ import annotations

import argparse

from rich.console import Console

import tokenpass
from tokenpass.bench import bench
from tokenpass.bench_report import render_bench
from tokenpass.models import load_tokenizer
from tokenpass.texts import describe_default_text, read_text, token_ids

PAPER = "tidaldecode:top_k=256:selection_layers=paper:per_kv_head=false:sparse_selection_output=false"
CONFIGS = {
    "TidalDecode (tuned default)": ["tidaldecode"],
    "TidalDecode (paper, k=256)": [PAPER],
    "Keyformer (KV cache: 25% of the prompt)": ["keyformer:kv_budget=0.25"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--continuation", type=int, default=128)
    args = parser.parse_args()
    console = Console(width=180)
    console.print(f"[bold]tokenpass demo[/bold]: SmolLM2-135M-Instruct on {describe_default_text()}")
    model = tokenpass.load("smollm2")
    ids = token_ids(load_tokenizer("smollm2"), read_text(), args.context + args.continuation)
    report = bench(model, CONFIGS, token_ids=ids, context=args.context, continuation=args.continuation, name="smollm2")
    render_bench(report, console)
    console.print(
        "baseline = the tokenpass runtime with no method pass (it reproduces transformers' greedy tokens); "
        "ratios are against it. Quality is teacher-forced on the continuation; see docs/benchmarks.md."
    )


if __name__ == "__main__":
    main()
