"""SkipDecode's graph ops: the per-step layer gate of the decode step and the per-position layer mask of
the training step.

Both take the step's ``input_ids`` (for its device and length, and to keep the op tied to the step) and
the schedule as plain arguments, so a saved graph carries its schedule and needs no side table.
``start = -1`` means "where the prompt ended", which only the runtime knows.
"""

from __future__ import annotations

import torch

LAYER_RUNS = "tokenpass::skipdecode_runs"
LAYER_MASK = "tokenpass::skipdecode_mask"
_SCHEDULE = "int layer, int num_layers, int max_layers, int min_layers, int warmup, int max_length, int start"

torch.library.define(LAYER_RUNS, f"(Tensor input_ids, {_SCHEDULE}, bool debug=False) -> Tensor")
torch.library.define(LAYER_MASK, f"(Tensor input_ids, {_SCHEDULE}) -> Tensor")


@torch.library.register_fake(LAYER_RUNS)
def _runs_fake(input_ids, layer, num_layers, max_layers, min_layers, warmup, max_length, start, debug=False):
    return torch.empty((), dtype=torch.bool)


@torch.library.register_fake(LAYER_MASK)
def _mask_fake(input_ids, layer, num_layers, max_layers, min_layers, warmup, max_length, start):
    return input_ids.new_empty((input_ids.shape[1],), dtype=torch.bool)


layer_runs_op = torch.ops.tokenpass.skipdecode_runs.default
layer_mask_op = torch.ops.tokenpass.skipdecode_mask.default
