"""Run lowered graphs (attention reading the runtime KV cache) one step at a time."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

import tokenpass.runtime.ops  # noqa: F401 - implements the core runtime ops the lowered graphs call
from tokenpass.errors import TokenpassError
from tokenpass.ir.capture import ModelSpec
from tokenpass.ir.capture_train import TRAIN
from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.requests import merge_slot_states
from tokenpass.runtime.context import using_cache
from tokenpass.runtime.kv_cache import KVCache
from tokenpass.runtime.training import TrainStep


def new_cache(graphs: Mapping[str, TokenGraph], batch: int, capacity: int = 64, budget: int | None = None) -> KVCache:
    """An empty cache for ``graphs`` (one model's phases): their layout, and every per-slot state they
    declare, in the model's dtype on the model's device (where the graphs' attention reads it)."""
    spec = next(iter(graphs.values())).spec
    states = merge_slot_states([state for graph in graphs.values() for state in graph.slot_states])
    return KVCache(spec.num_layers, batch, spec.num_kv_heads, spec.head_dim, spec.dtype, device=spec.device,
                   capacity=capacity, budget=budget, max_positions=spec.max_positions, slot_states=states)


def check_step_device(spec: ModelSpec, **tensors: torch.Tensor) -> None:
    """Refuse, in one line, step inputs that are not on the model's device (a CPU ``input_ids`` for a CUDA
    model would otherwise fail deep inside the graph, or silently copy every step). ``OptimizedModel``
    moves the caller's prompt; code that drives a session directly passes tensors on ``spec.device``."""
    for name, tensor in tensors.items():
        if tensor.device != spec.device:
            raise TokenpassError(f"{name} is on {tensor.device} but {spec.name} runs on {spec.device}: move it there "
                                 f"(OptimizedModel.__call__ and generate do)")


def run_step(
    graph: TokenGraph,
    cache: KVCache,
    input_ids: torch.Tensor,
    token_valid: torch.Tensor,
    position_ids: torch.Tensor,
    last_only: bool = False,
    module: Callable | None = None,
) -> torch.Tensor:
    """One forward step of a lowered graph over ``cache``; returns logits and commits the new slots.

    ``last_only`` asks for the last position's logits only (``[B, 1, V]``), when the graph allows it.
    ``module`` runs the step instead of ``graph.module()`` (a compiled module: ``runtime/compiled.py``).
    """
    batch, spec = input_ids.shape[0], graph.spec
    check_step_device(spec, input_ids=input_ids, token_valid=token_valid, position_ids=position_ids)
    cache.begin_step(position_ids, token_valid)
    empty = [torch.zeros((batch, spec.num_kv_heads, 0, spec.head_dim), dtype=spec.dtype, device=spec.device)]
    empty = empty * spec.num_layers
    second = torch.ones_like(input_ids)
    if last_only and "logit_rows" in graph.properties:
        second[:, :-1] = 0  # row 0 marks the positions whose logits are computed (select_logit_rows)
    with using_cache(cache), torch.no_grad():
        outputs = (module or graph.module())(input_ids, second, position_ids, empty, empty)
    cache.commit()
    cache.enforce_budget()
    return outputs[0]


def run_captured(graph: TokenGraph, inputs: tuple) -> tuple:
    """Run ``graph`` on the captured step's inputs and return the captured step's outputs.

    The training step runs without autograd here (verification compares values, not gradients).

    Graphs whose attention reads the runtime cache run through a fresh cache loaded with the past
    tensors, the cache contents after the step standing in for the ``present`` outputs (past ++ new);
    others run as they are. This is how exact passes are verified, lowering included.
    """
    if graph.phase == TRAIN:  # (input_ids, attention_mask, labels) -> (loss, logits or None)
        with torch.no_grad():
            out = TrainStep(graph)(*inputs)
        return out.loss, out.logits
    if not graph.reads_runtime_cache():
        return graph(*inputs)
    input_ids, attention_mask, position_ids, past_keys, past_values = inputs
    past = past_keys[0].shape[2]
    cache = new_cache({graph.phase or "step": graph}, input_ids.shape[0], capacity=past + input_ids.shape[1])
    if past:  # past slots keep the positions their keys were encoded at (windows compare positions)
        cache.begin_step((attention_mask[:, :past].long().cumsum(-1) - 1).clamp(min=0), attention_mask[:, :past])
        for layer, (k, v) in enumerate(zip(past_keys, past_values)):
            cache.stage(layer, k, v)
        cache.commit()
    logits = run_step(graph, cache, input_ids, attention_mask[:, past:], position_ids)
    keys = [layer.keys[:, :, : layer.length] for layer in cache.layers]
    values = [layer.values[:, :, : layer.length] for layer in cache.layers]
    return logits, keys, values
