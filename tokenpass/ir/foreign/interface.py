"""A foreign decoder's inputs and outputs mapped onto tokenpass's step interface.

tokenpass's runtimes (the ONNX runtime, onnxruntime-genai's config) drive a step by name:
``input_ids``, ``attention_mask``, ``position_ids`` (optional here), ``past_keys_<l>``/``past_values_<l>``
in, ``logits`` and ``present_keys_<l>``/``present_values_<l>`` out, in that order. A foreign file names
its cache its own way (``past_key_values.0.key``, ``present.0.value``...), so the cache is found by what
it is: the past a site's key/value ``Concat`` reads, the present that ``Concat``'s output, in layer
order. The three token inputs are HF's names, which every exporter of HF models keeps. The rest of a
``ModelSpec`` (heads, head size, vocabulary, dtype) is read off those values' static shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import torch

from tokenpass.errors import CaptureError
from tokenpass.ir.capture import ModelSpec
from tokenpass.ir.foreign.sites import OnnxAttentionSite
from tokenpass.ir.onnx_slots import static_dim

TOKEN_INPUTS = ("input_ids", "attention_mask")
OPTIONAL_INPUTS = ("position_ids",)
DTYPES = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16}


@dataclass
class StepInterface:
    """What ``normalize_interface`` renamed: tokenpass name -> the file's own name."""

    renamed: dict[str, str]


def normalize_interface(model: ir.Model, sites: list[OnnxAttentionSite], name: str) -> tuple[ModelSpec, StepInterface]:
    """Rename ``model``'s inputs and outputs to tokenpass's, outputs in tokenpass's order; returns the spec."""
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    missing = [n for n in TOKEN_INPUTS if n not in inputs]
    if missing:
        raise CaptureError(f"{name}: the graph has no '{missing[0]}' input (its inputs: {', '.join(inputs)}); "
                           "tokenpass drives a decoder through input_ids, attention_mask[, position_ids] and a "
                           "KV cache")
    cache = _cache_values(graph, sites, name)
    known = {*TOKEN_INPUTS, *OPTIONAL_INPUTS, *(v.name for v in cache["past"])}
    extra = [n for n in inputs if n not in known]
    if extra:
        raise CaptureError(f"{name}: input '{extra[0]}' is neither a token input nor a past the attention reads")
    presents = {id(v) for v in cache["present"]}
    logits = [v for v in graph.outputs if id(v) not in presents]
    if len(logits) != 1:
        raise CaptureError(f"{name}: expected one output besides the present keys/values, found "
                           f"{', '.join(v.name for v in logits) or 'none'}")
    renamed = {}
    layers = len(sites)
    targets = ([f"past_{kind}_{i}" for kind in ("keys", "values") for i in range(layers)] + ["logits"]
               + [f"present_{kind}_{i}" for kind in ("keys", "values") for i in range(layers)])
    for value, target in zip([*cache["past"], logits[0], *cache["present"]], targets):
        renamed[target] = value.name
        value.name = target
    graph.outputs.clear()
    graph.outputs.extend([logits[0], *cache["present"]])
    return _spec(name, sites, logits[0]), StepInterface(renamed)


def _cache_values(graph: ir.Graph, sites: list[OnnxAttentionSite], name: str) -> dict[str, list[ir.Value]]:
    """Past keys then past values (graph inputs) and present keys then values (graph outputs), by layer."""
    outputs = {id(v) for v in graph.outputs}
    for site in sites:
        for kind, value in (("keys", site.key), ("values", site.value)):
            if id(value) not in outputs:
                raise CaptureError(f"{name}: layer {site.layer}'s {kind} cat(past, new) is not a graph output, so "
                                   "the cache cannot be carried to the next step")
    return {"past": [s.past_key for s in sites] + [s.past_value for s in sites],
            "present": [s.key for s in sites] + [s.value for s in sites]}


def _spec(name: str, sites: list[OnnxAttentionSite], logits: ir.Value) -> ModelSpec:
    past = sites[0].past_key
    heads, head_dim = static_dim(past, 1), static_dim(past, 3)
    vocab = static_dim(logits, -1)
    if None in (heads, head_dim, vocab):
        raise CaptureError(f"{name}: the KV heads, head size and vocabulary must be static in the graph's shapes "
                           f"(past key {past.shape}, logits {logits.shape})")
    if past.dtype not in DTYPES:
        raise CaptureError(f"{name}: a KV cache of {past.dtype} is not supported (float32, float16, bfloat16)")
    return ModelSpec(name=name, num_layers=len(sites), num_kv_heads=heads, head_dim=head_dim, vocab_size=vocab,
                     max_positions=None, dtype=DTYPES[past.dtype])

