"""SkipDecode on SmolLM2: decode speed against the fraction of layers run, and quality with and without
fine-tuning, under the ``tokenpass bench`` protocol (teacher-forced over real text, against the dense model).

    python tools/bench_skipdecode.py speed [--context 512] [--tokens 64] [--rounds 3] [--batch 1] [--compile]
    python tools/bench_skipdecode.py quality [--weights NAME]
    python tools/bench_skipdecode.py finetune --skip 0.25 --steps 200 --evaluate-every 50 --save NAME [--init NAME]

Skip levels are fractions of the layers skipped at every decode step (``min_layers = max_layers``, warm-up 2):
the depth a linear schedule reaches at its end. Speed rounds are interleaved (every configuration once per
round) and reported as medians; the speed-up is against the dense runtime measured in the same rounds.
Quality is measured on the default corpus (licence texts); fine-tuning reads CPython's pydoc topics and,
with ``--train-text``, licence prose from the machine's package docs with every paragraph that shares a run
of eight words with the evaluation corpus dropped, so the evaluation text is never trained on.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

import tokenpass
from tokenpass.api import capture, fork, optimize_graphs
from tokenpass.bench import Run, compare, teacher_forced
from tokenpass.models import finetuned_dir, load_tokenizer
from tokenpass.texts import finetune_text, licence_prose, read_text, token_ids

WARMUP = 2  # the default: --warmup
TRAIN_TEXTS = {  # --train-text: none of them shares a run of eight words with the evaluation corpus
    "pydoc": finetune_text,
    "licences": licence_prose,
    "mixed": lambda: finetune_text() + "\n\n" + licence_prose(),
}


def skip_pass(num_layers: int, skip: float, warmup: int = WARMUP) -> tokenpass.SkipDecode:
    """Constant depth: ``skip`` of the layers skipped at every decode step, above ``warmup`` bottom layers."""
    depth = num_layers - round(skip * num_layers)
    return tokenpass.SkipDecode(min_layers=depth, max_layers=depth, warmup=warmup)


def _eval_tokens(context: int, continuation: int, text: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(token_ids(load_tokenizer(), read_text(text), context + continuation))
    return ids[:context].view(1, -1), ids[context:]


def speed(args) -> dict:
    if args.model == "smollm2":
        model = tokenpass.load("smollm2")
    else:
        model = tokenpass.models.random_model(args.model, torch.float32)
    layers = model.config.num_hidden_layers
    captured = capture(model)
    configs = {"dense": optimize_graphs(fork(captured), [], compile=args.compile)}
    for skip in args.skips:
        configs[f"skip {skip:.0%}"] = optimize_graphs(fork(captured), [skip_pass(layers, skip, args.warmup)],
                                                       compile=args.compile)
    shape = (args.batch, args.context + args.tokens)
    ids = torch.randint(3, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, optimized in configs.items():
            times[name].append(_decode_seconds(optimized, ids, args.context))
    dense = statistics.median(times["dense"])
    rows = []
    for name, optimized in configs.items():
        median = statistics.median(times[name])
        skip = 0.0 if name == "dense" else float(name.split()[1][:-1]) / 100
        depth = layers - round(skip * layers)
        rows.append({"config": name, "layers_run_fraction": depth / layers,
                     "decode_tokens_per_s": args.batch * args.tokens / median, "speedup": dense / median,
                     "rounds_s": times[name]})
    return {"model": args.model, "context": args.context, "tokens": args.tokens, "batch": args.batch,
            "compiled": args.compile,
            "threads": torch.get_num_threads(), "rows": rows}


def _decode_seconds(optimized, ids: torch.Tensor, context: int) -> float:
    """Seconds to decode ``ids[:, context:]`` one token per step after a prefill of ``context`` tokens."""
    batch = ids.shape[0]
    session = optimized.session(batch, capacity=ids.shape[1])
    ones = torch.ones((batch, 1), dtype=torch.long)
    with torch.no_grad():
        positions = torch.arange(context).expand(batch, -1)
        session.step(ids[:, :context], torch.ones_like(ids[:, :context]), positions, last_only=True)
        start = time.perf_counter()
        for i in range(context, ids.shape[1]):
            session.step(ids[:, i : i + 1], ones, torch.full((batch, 1), i))
        return time.perf_counter() - start


def quality_rows(model, dense: Run, prompt: torch.Tensor, cont: torch.Tensor, skips: list[float], label: str,
                 warmups: list[int]) -> list[dict]:
    """Perplexity ratio, top-1 agreement and KL against ``dense`` (the original model) per skip level."""
    layers = model.config.num_hidden_layers
    captured = capture(model)
    rows = []
    for skip in skips:
        for warmup in warmups:
            optimized = optimize_graphs(fork(captured), [skip_pass(layers, skip, warmup)])
            run = teacher_forced(optimized, prompt, cont, f"{label} skip {skip:.0%}")
            figures = compare(run, dense, cont, prompt.shape[1])
            rows.append({"weights": label, "skip": skip, "warmup": warmup,
                         **{k: figures[k] for k in ("ppl", "ppl_ratio", "top1_agreement", "kl")}})
    return rows


def quality(args) -> dict:
    prompt, cont = _eval_tokens(args.context, args.continuation, args.text)
    original = tokenpass.load("smollm2")
    dense = teacher_forced(tokenpass.optimize(original, []), prompt, cont, "dense")
    rows = quality_rows(original, dense, prompt, cont, args.skips, "original", args.warmups)
    if args.weights:
        rows += quality_rows(tokenpass.load(args.weights), dense, prompt, cont, args.skips, args.weights, args.warmups)
    return {"context": args.context, "continuation": args.continuation, "rows": rows}


def finetune(args) -> dict:
    prompt, cont = _eval_tokens(args.context, args.continuation, args.text)
    dense = teacher_forced(tokenpass.optimize(tokenpass.load("smollm2"), []), prompt, cont, "dense")
    model = tokenpass.load(args.init or "smollm2")  # --init: go on from an earlier run's weights
    layers = model.config.num_hidden_layers
    trained = skip_pass(layers, args.skip, args.warmup)
    skipping = tokenpass.optimize(model, [trained])  # shares the weights being trained

    best = [math.inf]

    def evaluate(step: int) -> dict:
        figures = compare(teacher_forced(skipping, prompt, cont, f"step {step}"), dense, cont, args.context)
        row = {k: figures[k] for k in ("ppl_ratio", "top1_agreement", "kl")}
        print(json.dumps({"step": step, **row}), file=sys.stderr, flush=True)
        if args.save and step and row["ppl_ratio"] < best[0]:  # a run stopped early keeps its best weights
            best[0] = row["ppl_ratio"]
            model.save_pretrained(finetuned_dir(f"{args.save}-best"))
        return row

    text = torch.tensor(load_tokenizer()(TRAIN_TEXTS[args.train_text](), add_special_tokens=False)["input_ids"])
    report = tokenpass.finetune(model, [trained], text, steps=args.steps, batch=args.batch,
                                seq_len=args.seq_len, lr=args.lr, save=args.save, evaluate=evaluate,
                                evaluate_every=args.evaluate_every, lr_end=args.lr_end,
                                teacher=tokenpass.load("smollm2") if args.distill else None)
    return {"skip": args.skip, "warmup": args.warmup, "train_text": args.train_text, "train_tokens": len(text),
            "init": args.init,
            "distill": args.distill,
            **report.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["speed", "quality", "finetune"])
    parser.add_argument("--model", default="smollm2", help="speed only: smollm2 or a random_model name")
    parser.add_argument("--skips", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.4, 0.5])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64, help="speed: decode steps per round")
    parser.add_argument("--batch", type=int, default=None, help="speed: 1; finetune: 4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=WARMUP, help="bottom layers that always run")
    parser.add_argument("--warmups", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="quality: warm-ups to compare (default: --warmup)")
    parser.add_argument("--compile", action="store_true", help="speed: run the steps compiled (torch.compile)")
    parser.add_argument("--text", default=None, help="quality/finetune: evaluate on this file, not the default corpus")
    parser.add_argument("--weights", help="quality: a fine-tuned model's name or directory, measured as well")
    parser.add_argument("--skip", type=float, default=0.25, help="finetune: the skip level trained")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--lr-end", type=float, default=None, help="finetune: decay the rate linearly to this")
    parser.add_argument("--evaluate-every", type=int, default=50)
    parser.add_argument("--save", default=None)
    parser.add_argument("--distill", action="store_true", help="finetune: KL to the unmodified model, not the text")
    parser.add_argument("--train-text", choices=sorted(TRAIN_TEXTS), default="pydoc",
                        help="finetune: pydoc topics, licence prose from /usr/share/doc, or both")
    parser.add_argument("--init", default=None, help="finetune: start from these saved weights (default: smollm2)")
    args = parser.parse_args()
    args.batch = args.batch or (4 if args.mode == "finetune" else 1)
    args.warmups = args.warmups or [args.warmup]
    result = {"speed": speed, "quality": quality, "finetune": finetune}[args.mode](args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
