"""The ONNX runtime against the torch runtime on one model: same tokens, logits, decode tokens/s.

Exports the model after ``--passes`` (``tokenpass.export_onnx``, timed) and optimises it with the same
passes for the torch runtime; generates ``--tokens`` greedy tokens from the same prompt with both and
compares them token for token, compares the prompt's logits and the decode steps' logits (teacher-forced
on the torch runtime's tokens), then times decode steps: every round runs each runtime once
(interleaved), medians reported. onnxruntime-genai's own generator runs the export too (its
``genai_config.json``): its tokens are compared and its decode steps timed in the same rounds.

    .venv/bin/python tools/bench_onnx.py --model smollm2 --tokens 64 --rounds 5
    .venv/bin/python tools/bench_onnx.py --model smollm2 --context 512 --passes tidaldecode:top_k=128

``--foreign 18`` (or 23) makes the ONNX files the way a user without tokenpass would, then has tokenpass
rewrite them: a plain ``torch.onnx.export`` at that opset (``tools/plain_onnx_export.py``), then
``tokenpass.optimize_onnx`` with ``--passes``; the torch runtime still optimises the model itself.
``--foreign genai`` starts from onnxruntime-genai's model builder instead (fused GroupQueryAttention,
``tools/genai_builder_export.py``) and also times the builder's own model under its own generator.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tokenpass
from tokenpass.models import load_tokenizer
from tokenpass.texts import read_text, token_ids


def prompt_ids(model_name: str, vocab: int, length: int) -> torch.Tensor:
    """Real text for SmolLM2 (its tokenizer), random ids for a tiny family."""
    if model_name == "smollm2":
        return torch.tensor([token_ids(load_tokenizer(), read_text(), length)[:length]])
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(0))


def decode_seconds(model, ids: torch.Tensor, tokens: int) -> float:
    """Seconds per decode step: a generation of ``tokens`` minus a one-token generation (the prefill)."""
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens + 1)
    return (time.perf_counter() - start - prefill) / tokens


class GenaiRunner:
    """onnxruntime-genai's generator over an export, with ``generate`` shaped like the runtimes' (batch 1)."""

    def __init__(self, directory: Path):
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(str(directory))

    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=ids.shape[1] + max_new_tokens, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids.int().numpy())
        while not generator.is_done():
            generator.generate_next_token()
        return torch.from_numpy(generator.get_sequence(0)).long()[None]


def first_difference(a: torch.Tensor, b: torch.Tensor, start: int) -> int | None:
    """The first new-token index where two ``[1, T]`` generations differ (None: equal as far as both go)."""
    return next((i for i, (x, y) in enumerate(zip(a[0, start:].tolist(), b[0, start:].tolist())) if x != y), None)


def decode_logits(model, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of every decode step when ``tokens`` after the first ``prompt`` are fed one per step."""
    session = model.session(tokens.shape[0], capacity=tokens.shape[1])
    positions = torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)
    valid = torch.ones_like(tokens)
    session.step(tokens[:, :prompt], valid[:, :prompt], positions[:, :prompt])
    steps = [session.step(tokens[:, t : t + 1], valid[:, t : t + 1], positions[:, t : t + 1])
             for t in range(prompt, tokens.shape[1])]
    return torch.cat(steps, 1)


def make_export(model, passes: list[str], directory: Path, foreign: str | None) -> tuple:
    """The export the ONNX runtimes run, the seconds each stage took, and the foreign file's directory."""
    seconds = {}
    start = time.perf_counter()
    if foreign is None:
        export = tokenpass.export_onnx(model, directory / "onnx", passes=passes)
        seconds["export_s"] = time.perf_counter() - start
        return export, seconds, None
    from tokenpass.onnx_export import token_ids

    if foreign == "genai":
        from genai_builder_export import genai_export

        plain = genai_export(model, directory / "genai")
    else:
        from plain_onnx_export import plain_export

        plain = plain_export(model, directory / "plain.onnx", opset=int(foreign))
    seconds["plain_export_s"] = time.perf_counter() - start
    start = time.perf_counter()
    export = tokenpass.optimize_onnx(plain, directory / "onnx", passes, token_ids=token_ids(model))
    seconds["optimize_onnx_s"] = time.perf_counter() - start
    return export, seconds, plain.parent if foreign == "genai" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 or a tiny family")
    parser.add_argument("--context", type=int, default=128, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens compared, and decode steps timed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--passes", default="", help="comma-separated passes (name:option=value) for both runtimes")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--foreign", choices=("18", "23", "genai"), default=None,
                        help="rewrite a plain torch.onnx.export at this opset, or onnxruntime-genai's builder's "
                             "model (fused GroupQueryAttention; its own file is timed too), instead of exporting")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    passes = [p for p in args.passes.split(",") if p]
    model = tokenpass.load(args.model) if args.model == "smollm2" else tokenpass.tiny(args.model)
    model.eval()
    ids = prompt_ids(args.model, model.config.vocab_size, args.context)
    torch_runtime = tokenpass.optimize(model, passes)
    with tempfile.TemporaryDirectory() as tmp:
        export, seconds, built = make_export(model, passes, Path(tmp), args.foreign)
        onnx_runtime = tokenpass.OnnxModel(export.directory)
        runners = {"torch": torch_runtime, "onnx": onnx_runtime}
        if (export.directory / "genai_config.json").is_file():  # not written for methods with a policy
            runners["genai"] = GenaiRunner(export.directory)
        if built is not None:  # the builder's own fused model under its own generator: the peer to beat
            runners["genai_builder_model"] = GenaiRunner(built)
        torch_tokens = torch_runtime.generate(ids, max_new_tokens=args.tokens)
        onnx_tokens = onnx_runtime.generate(ids, max_new_tokens=args.tokens)
        genai_tokens = runners["genai"].generate(ids, max_new_tokens=args.tokens) if "genai" in runners else None
        logits_diff = float((onnx_runtime(ids) - torch_runtime(ids)).abs().max())
        step_diff = float((decode_logits(onnx_runtime, torch_tokens, ids.shape[1])
                           - decode_logits(torch_runtime, torch_tokens, ids.shape[1])).abs().max())
        timings: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, runtime in runners.items():
                timings[name].append(decode_seconds(runtime, ids, args.tokens))
        file_mb = {p: f.stat().st_size / 2**20 for p, f in export.files.items()}
    per_step = {name: statistics.median(values) for name, values in timings.items()}
    print(json.dumps({
        "model": args.model, "passes": passes, "context": args.context, "tokens": args.tokens,
        "rounds": args.rounds, "threads": torch.get_num_threads(), "foreign": args.foreign,
        **{k: round(v, 1) for k, v in seconds.items()},
        "file_mb": {p: round(mb, 1) for p, mb in file_mb.items()}, "opset": export.opset,
        "greedy_tokens_equal": bool(torch.equal(torch_tokens, onnx_tokens)),
        "first_difference": first_difference(torch_tokens, onnx_tokens, ids.shape[1]),
        **({} if genai_tokens is None else {
            "genai_tokens_equal": bool(torch.equal(torch_tokens, genai_tokens)),
            "genai_first_difference": first_difference(torch_tokens, genai_tokens, ids.shape[1]),
            "genai_vs_torch": round(per_step["torch"] / per_step["genai"], 3)}),
        "max_logit_difference": logits_diff, "max_decode_logit_difference": step_diff,
        "decode_tokens_per_s": {name: round(1 / s, 2) for name, s in per_step.items()},
        "onnx_vs_torch": round(per_step["torch"] / per_step["onnx"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
