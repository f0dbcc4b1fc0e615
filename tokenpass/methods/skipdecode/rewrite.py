"""The ``skipdecode`` pass: token-level early exit that batches and keeps the KV cache consistent.

On the decode step each layer some position may skip becomes a gated branch (``gate.py``); on the training
step the same layers are masked per position (``mask.py``), so fine-tuning trains exactly what decoding
runs. Layers are found from the graph's attention sites and cut into blocks from what the graph computes
(``partition.py``); the schedule (``schedule.py``) is plain options stored in the graph's ops.

Check before rewriting: every block is cut (or the pass refuses, naming the layer) before any is gated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

from tokenpass.errors import PassError
from tokenpass.ir.capture import ModelSpec
from tokenpass.ir.capture_train import TRAIN
from tokenpass.ir.graph import TokenGraph
from tokenpass.methods.skipdecode.gate import GATE_META, gate_blocks
from tokenpass.methods.skipdecode.mask import mask_blocks
from tokenpass.methods.skipdecode.partition import NoBlock, cut_blocks
from tokenpass.methods.skipdecode.schedule import LinearSchedule, check_options
from tokenpass.passes.base import Miss, Pass, PassResult
from tokenpass.passes.registry import register

PROVIDES = "layer_skipping"


@register
@dataclass
class SkipDecode(Pass):
    """Decode tokens run ``warmup`` bottom layers and the top ``n(p) - warmup``; ``n`` falls linearly from
    ``max_layers`` (default: all) at ``start`` (default: the prompt's end) to ``min_layers`` (default: three
    quarters of the layers) at position ``max_length``. The prompt runs at full depth.

    Without fine-tuning, skipping costs a small model dearly (docs/benchmarks.md): fine-tune under the
    schedule with ``tokenpass.finetune``, which runs this pass on the training step.
    """

    name: ClassVar[str] = "skipdecode"
    exact: ClassVar[bool] = False
    provides: ClassVar[frozenset[str]] = frozenset({PROVIDES})
    phases: ClassVar[tuple[str, ...]] = ("decode", TRAIN)
    runs_last: ClassVar[bool] = True

    min_layers: int | None = None
    max_layers: int | None = None
    warmup: int = 2
    max_length: int = 512
    start: int | None = None
    debug: bool = False

    def validate(self) -> None:
        check_options(self.max_layers, self.min_layers, self.warmup, self.max_length)
        if self.start is not None and self.start < 0:
            raise PassError(f"skipdecode: start must be >= 0 (a position), got {self.start}")

    def check_model(self, spec: ModelSpec) -> None:
        self.schedule(spec.num_layers)

    def schedule(self, num_layers: int) -> LinearSchedule:
        """The schedule for a model of ``num_layers`` layers (every bound checked against it)."""
        min_layers = self.min_layers if self.min_layers is not None else math.ceil(0.75 * num_layers)
        max_layers = self.max_layers if self.max_layers is not None else num_layers
        return LinearSchedule(num_layers, max_layers, min_layers, self.warmup, self.max_length)

    def for_training(self, prompt_tokens: int, window: int) -> "SkipDecode":
        """The schedule over one training window: its first ``prompt_tokens`` are the prompt and the
        depth reaches ``min_layers`` at its last token, so every depth used at run time is trained."""
        return replace(self, start=prompt_tokens, max_length=window - 1)

    def schedule_args(self, plan: LinearSchedule) -> tuple:
        """The schedule as the ops' arguments (``start = -1``: the prompt's end, known at run time)."""
        return (plan.num_layers, plan.max_layers, plan.min_layers, plan.warmup, plan.max_length,
                -1 if self.start is None else self.start)

    def run(self, graph: TokenGraph) -> PassResult:
        result = PassResult(self.name, graph)
        if _applied(graph):
            result.counts["already_applied"] = 1
            return result
        layers = graph.sites().layers
        plan = self.schedule(len(layers))
        skippable = [layer.index for layer in layers if layer.index in plan.skippable()]
        result.counts["layers"], result.counts["skippable_layers"] = len(layers), len(skippable)
        miss = self._precondition(graph)
        if miss is not None:
            result.misses, result.applicable = [miss], False
            return result
        try:
            blocks = cut_blocks(graph.graph, {layer.module: layer.index for layer in layers}, skippable)
        except NoBlock as exc:
            result.misses, result.applicable = [exc.miss], False
            return result
        args = self.schedule_args(plan)
        carrying = next((b for b in blocks if b.carried), None)
        if graph.phase == TRAIN and carrying is not None:  # a per-position mask has no stand-in per position
            name = next(iter(carrying.carried)).name
            result.misses = [Miss(carrying.label, "cross-layer value", f"later layers read {name}; the training "
                                                                       f"step masks only the residual stream")]
            result.applicable = False
            return result
        if graph.phase == TRAIN:
            made = mask_blocks(graph, blocks, args)
            result.counts["masked_layers"] = len(made)
        else:
            made = gate_blocks(graph, blocks, args, self.debug)
            result.counts["gated_layers"] = len(made)
            result.counts["carried_values"] = sum(len(b.carried) for b in blocks)
        result.modified = bool(made)
        return result

    def _precondition(self, graph: TokenGraph) -> Miss | None:
        """Why this graph cannot take the schedule at all, or None."""
        if not graph.sites().layers:
            return Miss(graph.label, "decoder layers", "no attention site, so no layer to skip")
        if graph.phase == TRAIN and self.start is None:
            return Miss(graph.label, "start", "the training step has no prompt: set start (tokenpass.finetune does)")
        if graph.phase != TRAIN and not graph.reads_runtime_cache():
            return Miss(graph.label, "runtime KV cache", "the decode step was not lowered onto the runtime cache "
                                                         "(skipped layers' slots live there)")
        return None

    def ensures(self, graph: TokenGraph) -> list[Miss]:
        """Layer skipping holds once the graph's layers are gated (or none may ever be skipped)."""
        if _applied(graph):
            return []
        if graph.sites().layers and not list(self.schedule(len(graph.sites().layers)).skippable()):
            return []
        return [Miss(graph.label, "layers gated", "no layer was gated")]


def _applied(graph: TokenGraph) -> bool:
    """Whether this pass already gated or masked the graph's layers (nodes it made carry its mark)."""
    return any(n.meta.get("tokenpass", {}).get("pass") == GATE_META for n in graph.graph.nodes)
