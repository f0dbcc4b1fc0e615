"""tokenpass's runtime (no method pass) against the fastest ways a user would run the same model with
transformers, timed the same way on both sides, in one process.

Each configuration generates greedily from the same prompt of real text, and both sides are timed the
same way: a streamer (HF's ``streamer=``, tokenpass's ``streamer=``) stamps the clock as each new token
exists, so the gap between two stamps is one whole decode iteration (forward, sampling, appends, the
loop's bookkeeping) and the first stamp closes the prefill. A round's figure is the median gap of its run;
rounds are interleaved (every configuration once per round) and the median round is reported with the
range over rounds. (Subtracting a one-token run from a long one, as an earlier version did, let the
prefill's run-to-run noise swamp the decode time at 4096 tokens.) Peers:

* ``hf-dynamic``: ``model.generate`` with its default dynamic cache;
* ``hf-static``: ``cache_implementation="static"`` (a preallocated cache, HF's documented fast path);
* ``hf-static-compiled``: static cache with ``generate``'s own compilation of the decode step (what HF
  does by default on a GPU; ``CompileConfig(mode="default")`` forced on for the CPU; ``--compile-hf``,
  slow to compile on a small CPU, so off by default);
* ``tokenpass``: ``tokenpass.optimize(model)`` (no method pass), steps run op by op;
* ``tokenpass-compiled``: the same with ``compile=True`` (Inductor per shape bucket; ``--compile``);
* ``tokenpass-compiled-cpp``: compiled with Inductor's C++ wrapper (``--cpp-wrapper``: kernels called
  from C++, not Python; a much slower first compilation);
* ``tokenpass+<pass>``: with a method pass (``--passes tidaldecode``), also compiled with ``--compile``.

``--model llama-3.2-1b-random --dtype bfloat16`` times a randomly initialised model of that shape (on the
GPU when there is one): speed depends on shapes, not on trained weights.

Compilation happens in the warm-up, outside the timed rounds; its cost is printed, not hidden.

Every speed is also given as a fraction of the bandwidth ceiling (``tools/bandwidth.py``): the time a
step would take if it only had to stream its weights and live KV cache at the machine's read bandwidth
(the best of one read before the rounds and one after each context).

    .venv/bin/python tools/bench_runtime.py --contexts 512 4096 --batches 1 --new-tokens 32 --rounds 3 \
        --compile --compile-hf
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
from transformers import CompileConfig, StaticCache
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth import ceiling_ms, read_bandwidth  # noqa: E402

import tokenpass  # noqa: E402
from tokenpass.api import capture, fork, optimize_graphs  # noqa: E402
from tokenpass.models import REAL_SHAPES, load_tokenizer, random_model  # noqa: E402
from tokenpass.texts import read_text, token_ids  # noqa: E402

OnToken = Callable[[], None]
Generate = Callable[[torch.Tensor, int, int, OnToken], torch.Tensor]  # (prompt, new tokens, cache length, stamp)


class HFStamps(BaseStreamer):
    """HF's streamer protocol: ``put`` is called with the prompt first, then with each new token."""

    def __init__(self, on_token: OnToken):
        self.on_token, self.seen_prompt = on_token, False

    def put(self, value) -> None:
        if self.seen_prompt:
            self.on_token()
        self.seen_prompt = True

    def end(self) -> None:
        pass


def hf_generate(model, static: bool = False, **options) -> Generate:
    """HF ``generate``; ``static``: a fresh ``StaticCache`` of one fixed length per context, so runs of 1
    and of N new tokens share its shape (sized by ``max_new_tokens`` instead, every run would have a
    shape of its own, and the compiled peer would recompile on each)."""
    def run(prompt: torch.Tensor, new_tokens: int, cache_len: int, on_token: OnToken) -> torch.Tensor:
        cache = {"past_key_values": StaticCache(config=model.config, max_cache_len=cache_len)} if static else {}
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, streamer=HFStamps(on_token),
                                  **cache, **options)
    return run


def tokenpass_generate(optimized) -> Generate:
    def run(prompt: torch.Tensor, new_tokens: int, cache_len: int, on_token: OnToken) -> torch.Tensor:
        return optimized.generate(prompt, max_new_tokens=new_tokens, streamer=lambda tokens: on_token())
    return run


def hf_compile_config() -> CompileConfig:
    """HF ``generate``'s own decode-step compilation, which it turns on by itself on GPUs with a static
    cache; ``reduce-overhead`` (CUDA graphs) has no CPU meaning, so Inductor's default mode there."""
    config = CompileConfig(fullgraph=True, mode="reduce-overhead" if torch.cuda.is_available() else "default")
    config._compile_all_devices = True  # HF's own switch for compiling off-GPU
    return config


def peers(model, compile_hf: bool, compile_tokenpass: bool, passes: list[str], cpp_wrapper: bool = False
          ) -> dict[str, Generate]:
    """HF's configurations, then tokenpass with no method pass and with each of ``passes`` (one pass spec
    each: ``tidaldecode``, ``tidaldecode:top_k=512``), each also compiled with ``compile_tokenpass``."""
    configs = {"hf-dynamic": hf_generate(model), "hf-static": hf_generate(model, static=True)}
    if compile_hf:
        configs["hf-static-compiled"] = hf_generate(model, static=True, compile_config=hf_compile_config())
    captured = capture(model)
    for spec in ["", *passes]:
        optimized = optimize_graphs(fork(captured), [spec] if spec else [])
        label = "tokenpass" + (f"+{spec}" if spec else "")
        configs[label] = tokenpass_generate(optimized)
        if compile_tokenpass:
            configs[f"{label}-compiled"] = tokenpass_generate(optimized.compiled())
            if cpp_wrapper:
                configs[f"{label}-compiled-cpp"] = tokenpass_generate(optimized.compiled(cpp_wrapper=True))
    return configs


def _clock(device: torch.device) -> float:
    """``time.perf_counter`` once ``device`` has finished its queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(run: Generate, prompt: torch.Tensor, new_tokens: int, cache_len: int
          ) -> tuple[float, list[float], torch.Tensor]:
    """Prefill seconds, the decode iterations' seconds (gaps between token stamps) and the tokens."""
    stamps = [_clock(prompt.device)]
    out = run(prompt, new_tokens, cache_len, lambda: stamps.append(_clock(prompt.device)))
    if len(stamps) != new_tokens + 1:
        raise RuntimeError(f"expected {new_tokens} token stamps, got {len(stamps) - 1}")
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return stamps[1] - stamps[0], gaps, out


def measure(configs: dict[str, Generate], prompt: torch.Tensor, new_tokens: int, rounds: int) -> dict[str, dict]:
    """Interleaved rounds; per config each round's median decode ms/token, its prefill s, and the tokens."""
    cache_len = prompt.shape[1] + new_tokens
    for name, run in configs.items():  # warm-up (first-call costs, compilation) outside the timed rounds
        start = time.perf_counter()
        run(prompt[:, :16], 2, cache_len, lambda: None)
        run(prompt, 2, cache_len, lambda: None)
        print(f"{name}: warm-up (first calls, compilation) {time.perf_counter() - start:.1f} s", file=sys.stderr)
    results: dict[str, dict] = {name: {"samples": [], "prefill_s": []} for name in configs}
    for _ in range(rounds):
        for name, run in configs.items():
            prefill, gaps, results[name]["tokens"] = timed(run, prompt, new_tokens, cache_len)
            results[name]["samples"].append(1000 * statistics.median(gaps))
            results[name]["prefill_s"].append(prefill)
    return results


def summarise(results: dict[str, dict], context: int, batch: int, new_tokens: int, ceiling: float) -> list[dict]:
    fastest_hf = min(statistics.median(r["samples"]) for name, r in results.items() if name.startswith("hf"))
    reference = results["hf-dynamic"]["tokens"]
    rows = []
    for name, r in results.items():
        median = statistics.median(r["samples"])
        rows.append({
            "config": name, "context": context, "batch": batch, "new_tokens": new_tokens,
            "decode_ms": median, "min_ms": min(r["samples"]), "max_ms": max(r["samples"]),
            "prefill_s": statistics.median(r["prefill_s"]),
            "tokens_per_s": 1000 * batch / median, "vs_fastest_hf": fastest_hf / median,
            "ceiling_ms": ceiling, "of_ceiling": ceiling / median,
            "same_tokens_as_hf": bool(torch.equal(r["tokens"], reference)),
        })
    return rows


def render(rows: list[dict], bandwidth: float, model: str, device: str) -> None:
    table = Table(title=f"{model} greedy generate on {device}, decode ms/token (median \\[min-max]); read "
                        f"bandwidth {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} threads")
    for col in ("context", "batch", "config", "prefill s", "ms/token", "tokens/s", "vs fastest HF", "of ceiling",
                "same tokens"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["context"]), str(r["batch"]), r["config"], f"{r['prefill_s']:.2f}",
                      f"{r['decode_ms']:.1f} [{r['min_ms']:.1f}-{r['max_ms']:.1f}]", f"{r['tokens_per_s']:.1f}",
                      f"{r['vs_fastest_hf']:.2f}x", f"{100 * r['of_ceiling']:.0f}%", str(r["same_tokens_as_hf"]))
    Console(width=170).print(table)


def load_model(name: str, dtype: torch.dtype, device: str):
    """SmolLM2 (real weights) or a randomly initialised real shape (``tokenpass.models.REAL_SHAPES``)."""
    if name == "smollm2":
        return tokenpass.load("smollm2", dtype=dtype).to(device)
    return random_model(name.removesuffix("-random"), dtype=dtype, device=device)


def prompt_ids(name: str, vocab_size: int, count: int) -> list[int]:
    """Real text for SmolLM2; seeded random ids for a random model (its speed does not depend on them)."""
    if name == "smollm2":
        return token_ids(load_tokenizer("smollm2"), read_text(), count)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (count,), generator=generator).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", *(f"{n}-random" for n in REAL_SHAPES)])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile-hf", action="store_true", help="add HF static cache + compiled decode step")
    parser.add_argument("--compile", action="store_true", help="add tokenpass with compiled steps")
    parser.add_argument("--cpp-wrapper", action="store_true",
                        help="with --compile, also tokenpass compiled with Inductor's C++ wrapper (slow first compile)")
    parser.add_argument("--passes", nargs="*", default=[], help="method pass specs to add as tokenpass rows")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    args = parser.parse_args()
    model = load_model(args.model, getattr(torch, args.dtype), args.device)
    configs = peers(model, args.compile_hf, args.compile, args.passes, args.cpp_wrapper)
    ids = prompt_ids(args.model, model.config.vocab_size, max(args.contexts) + max(args.batches))
    # The ceiling is what the machine can do: the best of several reads (one taken while something else
    # ran would make every figure look closer to it than it is).
    bandwidths = [read_bandwidth(args.device)]
    measured = []
    for context in args.contexts:
        for batch in args.batches:
            prompt = torch.tensor([ids[i : i + context] for i in range(batch)], device=args.device)
            measured.append((context, batch, measure(configs, prompt, args.new_tokens, args.rounds)))
            bandwidths.append(read_bandwidth(args.device))
    bandwidth = max(bandwidths)
    rows = [row for context, batch, results in measured
            for row in summarise(results, context, batch, args.new_tokens, ceiling_ms(model, context, bandwidth, batch))]
    report = json.dumps({"model": args.model, "dtype": args.dtype, "device": args.device,
                         "bandwidth_bytes_per_s": bandwidth, "bandwidth_reads": bandwidths, "threads": torch.get_num_threads(), "rows": rows},
                        indent=2)
    if args.out:
        args.out.write_text(report + "\n")
    if args.json:
        print(report)
    else:
        render(rows, bandwidth, args.model, args.device)


if __name__ == "__main__":
    main()
