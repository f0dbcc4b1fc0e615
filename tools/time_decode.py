"""Decode latency of several configurations in one process, repeated: a quick A/B timer.

``tokenpass bench`` gives the reference figures (quality and speed together); this script only times
teacher-forced decode steps after one prefill per configuration, and repeats the round so that drift on
a shared machine shows.

    .venv/bin/python tools/time_decode.py --context 7936 --steps 64 dense tidaldecode tidaldecode:score_fraction=1.0
"""

from __future__ import annotations

import argparse

import torch

import tokenpass
from tokenpass.bench import teacher_forced
from tokenpass.models import load_tokenizer
from tokenpass.texts import read_text, token_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="'dense' or a pass spec (one pass per config)")
    parser.add_argument("--context", type=int, default=7936)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model = tokenpass.load("smollm2")
    ids = torch.tensor(token_ids(load_tokenizer("smollm2"), read_text(), args.context + args.steps))[None]
    models = {c: tokenpass.optimize(model, passes=[] if c == "dense" else [c]) for c in args.configs}
    for round_ in range(args.rounds):
        for config, optimized in models.items():
            run = teacher_forced(optimized, ids[:, : args.context], ids[0, args.context :], config)
            print(f"round {round_}  {1000 * run.decode_s / run.decode_steps:7.1f} ms/token  {config}", flush=True)


if __name__ == "__main__":
    main()
