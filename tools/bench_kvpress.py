"""NVIDIA kvpress's presses on SmolLM2 under the protocol of ``tools/bench_kv_eviction.py quality``.

kvpress pins ``transformers<5.3``, older than tokenpass's, so this script runs in its own environment
and imports nothing of tokenpass; it is a benchmark, not a dependency:

    python3.11 -m venv /work/kvpress-venv
    /work/kvpress-venv/bin/pip install torch==2.13.0 kvpress 'transformers>=4.56,<5.3'
    .venv/bin/python tools/bench_kv_eviction.py tokens --context 4096 --continuation 256 -o /tmp/ids.pt
    /work/kvpress-venv/bin/python tools/bench_kvpress.py /tmp/ids.pt ~/.cache/tokenpass/smollm2-135m-instruct-v1

The same token ids, the same dense model (HF's own forward here), and the same figures: prefill the
context, teacher-force the continuation one token per step, compare each next-token distribution with
the dense model's (perplexity ratio, top-1 agreement, mean KL(dense || press)). A press compresses the
context's cache at prefill to ``1 - budget`` of it (kvpress's ``compression_ratio``); during decoding
the cache then grows by one token per step, where tokenpass's eviction passes keep the budget.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache


def teacher_forced(model, ids: torch.Tensor, context: int, press=None) -> torch.Tensor:
    """Next-token log-probabilities ``[M, V]`` for the continuation after ``ids[:context]``."""
    cache = DynamicCache()
    rows = []
    with torch.no_grad():
        if press is None:
            out = model(input_ids=ids[None, :context], past_key_values=cache, use_cache=True)
        else:
            with press(model):
                out = model(input_ids=ids[None, :context], past_key_values=cache, use_cache=True)
        rows.append(out.logits[0, -1].float().log_softmax(-1))
        for i in range(context, len(ids) - 1):
            out = model(input_ids=ids[None, i : i + 1], past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[i]]))
            rows.append(out.logits[0, -1].float().log_softmax(-1))
    return torch.stack(rows)


def compare(run: torch.Tensor, dense: torch.Tensor, targets: torch.Tensor) -> dict:
    nll = -run.gather(1, targets[:, None]).mean().item()
    dense_nll = -dense.gather(1, targets[:, None]).mean().item()
    kl = F.kl_div(run, dense, log_target=True, reduction="batchmean").item()
    agreement = (run.argmax(1) == dense.argmax(1)).float().mean().item()
    return {"ppl_ratio": math.exp(nll - dense_nll), "top1_agreement": agreement, "kl": kl}


def presses(budget: float) -> dict:
    import kvpress

    ratio = 1.0 - budget
    return {"StreamingLLMPress": kvpress.StreamingLLMPress(compression_ratio=ratio),
            "ObservedAttentionPress (H2O-like)": kvpress.ObservedAttentionPress(compression_ratio=ratio),
            "SnapKVPress": kvpress.SnapKVPress(compression_ratio=ratio),
            "TOVAPress": kvpress.TOVAPress(compression_ratio=ratio),
            "KnormPress": kvpress.KnormPress(compression_ratio=ratio)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokens", help="a .pt file from bench_kv_eviction.py tokens")
    parser.add_argument("model_dir")
    parser.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.25, 0.1])
    args = parser.parse_args()
    saved = torch.load(args.tokens)
    ids, context = saved["ids"], saved["context"]
    targets = ids[context:]
    dense_model = AutoModelForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32,
                                                       attn_implementation="sdpa").eval()
    eager_model = AutoModelForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32,
                                                       attn_implementation="eager").eval()  # presses that read weights
    dense = teacher_forced(dense_model, ids, context)
    rows = []
    for budget in args.budgets:
        for name, press in presses(budget).items():
            model = eager_model if name.startswith("Observed") else dense_model
            run = teacher_forced(model, ids, context, press)
            row = {"press": name, "budget": budget, **compare(run, dense, targets)}
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    print(json.dumps({"context": context, "continuation": len(targets), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
