"""A plain ``torch.onnx.export`` of a Hugging Face causal LM with its KV cache as inputs and outputs:
what a user without tokenpass writes (as optimum's exporter does), the "foreign" file that
``tokenpass.optimize_onnx`` / ``tokenpass export FILE.onnx`` take. Nothing of tokenpass is used.

    .venv/bin/python tools/plain_onnx_export.py smollm2 /tmp/smollm2.onnx            # opset 18: MatMul/Softmax
    .venv/bin/python tools/plain_onnx_export.py smollm2 /tmp/smollm2-23.onnx --opset 23   # Attention nodes

Inputs ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.<l>.key|value``; outputs
the logits then each layer's present key and value. Batch, new tokens and past are dynamic axes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch.export import Dim


class WithFlatCache(torch.nn.Module):
    """The HF model with its cache as flat tensors: ``DynamicCache`` built from the past, presents returned."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def plain_export(model: torch.nn.Module, path: str | Path, opset: int = 18) -> Path:
    """``torch.onnx.export(dynamo=True)`` of ``model`` (eval mode) with a flat KV cache, saved at ``path``."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    batch, new, past_len = 2, 3, 5
    generator = torch.Generator().manual_seed(0)
    past = tuple(torch.randn(batch, heads, past_len, head_dim, generator=generator, dtype=model.dtype)
                 for _ in range(2 * config.num_hidden_layers))
    ids = torch.randint(0, config.vocab_size, (batch, new), generator=generator)
    mask = torch.ones(batch, past_len + new, dtype=torch.long)
    positions = torch.arange(past_len, past_len + new).expand(batch, new)
    b, t, p, s = Dim("batch"), Dim("tokens"), Dim("past"), Dim("total")
    shapes = ({0: b, 1: t}, {0: b, 1: s}, {0: b, 1: t}, tuple({0: b, 2: p} for _ in past))
    names = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(config.num_hidden_layers) for kind in ("key", "value")]
    quiet, exporter_log = io.StringIO(), logging.getLogger("torch.onnx")
    exporter_log.setLevel(logging.ERROR)
    with contextlib.redirect_stdout(quiet), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(WithFlatCache(model.eval()), (ids, mask, positions, past), dynamo=True,
                                    dynamic_shapes=shapes, input_names=names, opset_version=opset)
    program.save(str(path))
    return Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="smollm2 or a tiny family")
    parser.add_argument("output", type=Path)
    parser.add_argument("--opset", type=int, default=18)
    args = parser.parse_args()
    import tokenpass

    print(plain_export(tokenpass.load(args.model), args.output, args.opset))


if __name__ == "__main__":
    main()
