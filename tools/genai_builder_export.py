"""An onnxruntime-genai model of a Hugging Face causal LM, made by onnxruntime-genai's own model builder:
the other "foreign" file ``tokenpass.optimize_onnx`` takes, whose attention is onnxruntime's fused
``com.microsoft.GroupQueryAttention`` (packed QKV, rotary inside the op, padding as ``seqlens_k``) and
whose norms are onnxruntime's ``SimplifiedLayerNormalization`` ops. Nothing of tokenpass is used but the
tokenizer, which the builder insists on.

    .venv/bin/python tools/genai_builder_export.py smollm2 /tmp/smollm2-genai    # writes model.onnx there
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def genai_export(model: torch.nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """``model`` (fp32, CPU) written by ``onnxruntime_genai.models.builder`` into ``directory``; returns
    the ``model.onnx`` path. ``tokenizer``: saved beside the weights (default: SmolLM2's)."""
    if tokenizer is None:
        from tokenpass.models import load_tokenizer

        tokenizer = load_tokenizer()
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as source:
        model.save_pretrained(source)
        tokenizer.save_pretrained(source)
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", source, "-o", str(directory),
                   "-p", "fp32", "-e", "cpu"]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai's builder failed: {done.stderr.strip().splitlines()[-1:]}")
    return directory / "model.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="smollm2, or a tokenpass.models.random_model name")
    parser.add_argument("directory")
    args = parser.parse_args()
    import tokenpass

    model = tokenpass.load("smollm2") if args.model == "smollm2" else tokenpass.models.random_model(args.model)
    print(genai_export(model.float(), args.directory))


if __name__ == "__main__":
    main()
