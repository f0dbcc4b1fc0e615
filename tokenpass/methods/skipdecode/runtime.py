"""Run-time implementations of SkipDecode's ops.

The gate runs on the host: the decision is one boolean per layer and step, shared by the batch, taken
from the step's index in the left-padded sequence (``KVCache.sequence_length``: eviction does not move it),
so every row agrees. The prompt's end is remembered in the cache's ``notes`` at the first
decode step. With ``debug`` the gate asserts the KV invariant: a layer that runs at slot ``i`` after the
prompt also ran at slot ``i - 1``, so its cache holds every earlier token.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from tokenpass.errors import TokenpassError
from tokenpass.methods.skipdecode.ops import LAYER_MASK, LAYER_RUNS
from tokenpass.methods.skipdecode.schedule import LinearSchedule
from tokenpass.runtime.context import active_cache

PROMPT_END = "skipdecode.prompt_end"
LAST_RUN = "skipdecode.last_run"  # layer -> the last slot it ran at
GATE_CALLS = "skipdecode.gate_calls"  # (gated layer, step) decisions taken
GATE_RUNS = "skipdecode.gate_runs"  # of which ran


@lru_cache(maxsize=64)
def schedule(num_layers: int, max_layers: int, min_layers: int, warmup: int, max_length: int) -> LinearSchedule:
    return LinearSchedule(num_layers, max_layers, min_layers, warmup, max_length)


@torch.library.impl(LAYER_RUNS, "CompositeExplicitAutograd")
def layer_runs(input_ids, layer, num_layers, max_layers, min_layers, warmup, max_length, start, debug=False):
    cache = active_cache()
    slot = cache.sequence_length  # not cache.length: eviction (a KV budget) shrinks that
    notes = cache.notes
    if start < 0:
        start = notes.setdefault(PROMPT_END, slot)
    runs = schedule(num_layers, max_layers, min_layers, warmup, max_length).runs(layer, slot, start)
    last_run = notes.setdefault(LAST_RUN, {})
    if debug and runs and slot > start and last_run.get(layer) != slot - 1:
        raise TokenpassError(f"skipdecode: KV invariant violated: layer {layer} runs at slot {slot} but did not "
                             f"run at slot {slot - 1}, whose keys it would read")
    if runs:
        last_run[layer] = slot
    notes[GATE_CALLS] = notes.get(GATE_CALLS, 0) + 1
    notes[GATE_RUNS] = notes.get(GATE_RUNS, 0) + int(runs)
    return torch.tensor(runs)


@torch.library.impl(LAYER_MASK, "CompositeExplicitAutograd")
def layer_mask(input_ids, layer, num_layers, max_layers, min_layers, warmup, max_length, start):
    plan = schedule(num_layers, max_layers, min_layers, warmup, max_length)
    runs = [plan.runs(layer, position, start) for position in range(input_ids.shape[1])]
    return torch.tensor(runs, dtype=torch.bool, device=input_ids.device)
