"""Needle in a haystack from text on this machine: a number planted at several depths of a long context.

The haystack is the default licence text; the needle sentence is inserted at each depth, the question
is asked at the end, and the greedy answer must contain the number. Each configuration (dense, and the
pass lists given) answers every depth.

    .venv/bin/python tools/needle.py --context 4096 --depths 0.1 0.5 0.9 \
        --passes tidaldecode:top_k=256:selection_layers=2/13
"""

from __future__ import annotations

import argparse
import json

import torch
from rich.console import Console
from rich.table import Table

import tokenpass
from tokenpass.models import load_tokenizer
from tokenpass.texts import read_text

NEEDLE = " The secret number is {number}. Remember it: the secret number is {number}. "
QUESTION = "\n\nQuestion: What is the secret number mentioned in the text above?\nAnswer: The secret number is"


def haystack_prompt(tokenizer, context: int, depth: float, number: int) -> torch.Tensor:
    """``context`` tokens: licence text with the needle at ``depth`` (0 = start, 1 = end), then the question."""
    filler = tokenizer(read_text(), add_special_tokens=False)["input_ids"]
    needle = tokenizer(NEEDLE.format(number=number), add_special_tokens=False)["input_ids"]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    room = context - len(needle) - len(question)
    while len(filler) < room:
        filler = filler + filler
    filler = filler[:room]
    cut = int(depth * room)
    return torch.tensor([filler[:cut] + needle + filler[cut:] + question])


def run(context: int, depths: list[float], pass_lists: list[str], number: int = 73914) -> list[dict]:
    model = tokenpass.load("smollm2")
    tokenizer = load_tokenizer("smollm2")
    rows = []
    for label, passes in [("dense", [])] + [(p, [p]) for p in pass_lists]:
        optimized = tokenpass.optimize(model, passes=passes, name="smollm2")
        for depth in depths:
            prompt = haystack_prompt(tokenizer, context, depth, number)
            out = optimized.generate(prompt, max_new_tokens=8)
            answer = tokenizer.decode(out[0, prompt.shape[1]:])
            rows.append({"config": label, "depth": depth, "answer": answer.strip(), "found": str(number) in answer})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--passes", nargs="*", default=["tidaldecode:top_k=256:selection_layers=2/13"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = run(args.context, args.depths, args.passes)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"needle in a {args.context}-token haystack (SmolLM2, greedy)")
    for col in ("config", "depth", "found", "answer"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["config"], f"{r['depth']:.1f}", "yes" if r["found"] else "NO", r["answer"])
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
