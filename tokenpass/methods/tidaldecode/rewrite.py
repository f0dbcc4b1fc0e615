"""TidalDecode: position-persistent sparse attention across layers (decode step only).

Layers below ``sparse_start`` attend densely. Each *selection layer* attends densely (or over its own
choice, with ``sparse_selection_output``) and picks, per query head (or per KV head), the ``top_k``
cache slots its query scored highest. Every later layer attends only to the slots picked by the most
recent selection layer below it, plus its own new token. Keys keep their original positions.

Before (decode step after lowering; layers 0..L-1)::

    out_l = tokenpass.cached_attention(q_l, k_l, v_l, scale, l)                  # every layer

After (sparse_start=2, selection_layers=[2, 12])::

    out_0 = tokenpass.cached_attention(q_0, k_0, v_0, scale, 0)                  # dense
    sel_2 = tokenpass.selection_attention(q_2, k_2, v_2, scale, 2, top_k, ...)   # dense + choose
    out_2, slots_2 = sel_2[0], sel_2[1]
    out_3 = tokenpass.sparse_attention(q_3, k_3, v_3, slots_2, scale, 3)         # reads slots_2
    ...
    sel_12 = tokenpass.selection_attention(...); slots_12 = sel_12[1]
    out_13 = tokenpass.sparse_attention(q_13, k_13, v_13, slots_12, scale, 13)

Cheaper ranking (sparse-output selection layers only): a selection layer that attends over its own
choice reads every key just to rank them, so it ranks with an approximation: of a channel-major copy of
the keys that the runtime cache keeps in step, it reads only the ``score_fraction`` of channels where the
query group has the most magnitude (SparQ's observation that those dominate ``q . k``), as contiguous
rows. Default: a quarter of the channels, a quarter of the bytes of an exact ranking, with no measurable
quality cost on SmolLM2 (docs/benchmarks.md). ``score_dtype`` stores that copy in another dtype
(``bfloat16``: half the bytes, Double Sparsity's "label cache"; on this project's CPU bf16 GEMMs with
three query rows run slower than fp32 ones, so the default keeps the cache's dtype). Attention itself
still reads the cache's own keys and values.

Cache correction (the paper's, absent from its released code): with ``correction_interval=n`` the
runtime re-encodes every n sparsely decoded tokens with the dense prefill step, overwriting their
keys/values, which bounds drift over long generations.

The ``slots`` edges from selection to sparse layers are ordinary graph data edges (``tokenpass inspect
--passes tidaldecode`` draws them). Prefill is untouched: the pass applies to the decode graph.

Explicit cache (a graph not lowered, e.g. for ``export_onnx``): the same rewrite onto
``tokenpass.explicit_selection_attention`` / ``explicit_sparse_attention``, which read the layer's
``cat(past, new)`` keys/values and the model's mask (checked to be causal + padding first, as lowering
checks it) and keep no state between steps, so the export's past/present cache is the whole state::

    sel_2 = tokenpass.explicit_selection_attention(q_2, cat(past_k_2, k_2), cat(past_v_2, v_2), mask, ...)
    out_3 = tokenpass.explicit_sparse_attention(q_3, cat(past_k_3, k_3), cat(past_v_3, v_3), mask, slots_2, ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from tokenpass.errors import PassError
from tokenpass.ir.capture import ModelSpec
from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.sites import AttentionSite
from tokenpass.ir.requests import PolicySpec, SlotState
from tokenpass.methods.tidaldecode.correction import POLICY as CORRECTION_POLICY
from tokenpass.methods.tidaldecode.explicit_ops import explicit_selection_op, explicit_sparse_op
from tokenpass.methods.tidaldecode.ops import SCORE_KEYS, selection_attention_op, sparse_attention_op
from tokenpass.passes.base import Miss, Pass, PassResult
from tokenpass.passes.explicit_cache import EXPLICIT, cache_form, site_window
from tokenpass.passes.registry import register
from tokenpass.passes.rewrite import replace_node, replace_with_pair

METHOD_OPS = (selection_attention_op, sparse_attention_op, explicit_selection_op, explicit_sparse_op)
# The rewrite's ops on each cache form: (selection op, sparse op).
CACHED_FORM = (selection_attention_op, sparse_attention_op)
EXPLICIT_FORM = (explicit_selection_op, explicit_sparse_op)

# The paper's scripts re-select at layer 13 of Llama-3-8B's 32 layers.
PAPER_RESELECT_FRACTION = 13 / 32


def paper_selection_layers(num_layers: int, sparse_start: int) -> list[int]:
    """The paper's two selection layers: ``sparse_start`` and one in the middle of the stack."""
    middle = max(sparse_start + 1, round(PAPER_RESELECT_FRACTION * num_layers))
    return [sparse_start] + ([middle] if middle < num_layers else [])


def check_set_name(name: str) -> None:
    """Refuse a selection-set name other than ``paper``, ``all`` or ``everyN`` (N >= 1)."""
    if name in ("paper", "all") or (name.startswith("every") and name[5:].isdigit() and int(name[5:]) >= 1):
        return
    raise PassError(f"tidaldecode: selection_layers {name!r} is not 'paper', 'all', 'everyN' or a list of layers")


def named_selection_layers(name: str, num_layers: int, sparse_start: int) -> list[int]:
    """``paper``, ``all`` (every layer from ``sparse_start``) or ``everyN`` (every N-th layer from it)."""
    check_set_name(name)
    if name == "paper":
        return paper_selection_layers(num_layers, sparse_start)
    if name == "all":
        return list(range(sparse_start, num_layers))
    return list(range(sparse_start, num_layers, int(name[5:])))


@register
@dataclass(repr=True)
class TidalDecode(Pass):
    """Defaults: the configuration tuned on SmolLM2 (docs/benchmarks.md): re-select at every second layer,
    one selection per KV head (its query heads vote), selection layers reading values only at their own
    selection and ranking with a quarter of each key's channels. ``TidalDecode.paper()`` gives the paper's
    configuration. ``score_dtype`` and ``score_fraction`` have no effect on dense selection layers
    (``sparse_selection_output=False``): their attention pass yields exact scores. Sliding-window layers
    stay windowed-dense: a window already bounds what they read. Runs on the runtime cache (after
    ``lower_kv_cache``) or on explicit cache tensors (canonical attention, e.g. for ONNX export)."""

    name: ClassVar[str] = "tidaldecode"
    exact: ClassVar[bool] = False
    requires: ClassVar[frozenset[str]] = frozenset({"attention_canonical"})
    provides: ClassVar[frozenset[str]] = frozenset({"sparse_attention"})
    phases: ClassVar[tuple[str, ...]] = ("decode",)

    top_k: int = 1024
    sparse_start: int = 2
    selection_layers: list[int] | str = "every2"
    per_kv_head: bool = True
    sparse_selection_output: bool = True
    correction_interval: int | None = None
    score_dtype: Literal["bfloat16", "float16", "float32"] | None = None
    score_fraction: float = 0.25

    def validate(self) -> None:
        if self.top_k < 1:
            raise PassError(f"tidaldecode: top_k must be a positive integer, got {self.top_k!r}")
        if self.sparse_start < 0:
            raise PassError(f"tidaldecode: sparse_start must be a non-negative integer, got {self.sparse_start!r}")
        if isinstance(self.selection_layers, str):
            check_set_name(self.selection_layers)
        else:
            layers = list(self.selection_layers)
            if not layers or any(b <= a for a, b in zip(layers, layers[1:])):
                raise PassError(f"tidaldecode: selection_layers must be a non-empty increasing list, got {layers}")
            if layers[0] < self.sparse_start:
                raise PassError(
                    f"tidaldecode: selection layer {layers[0]} is below sparse_start={self.sparse_start}; "
                    "layers below sparse_start are dense"
                )
            self.selection_layers = layers
        if self.correction_interval is not None and self.correction_interval < 2:
            raise PassError(f"tidaldecode: correction_interval must be an integer >= 2, got {self.correction_interval!r}")
        if not 0 < self.score_fraction <= 1:
            raise PassError(f"tidaldecode: score_fraction must be in (0, 1], got {self.score_fraction!r}")

    @classmethod
    def paper(cls, top_k: int = 256, **options) -> "TidalDecode":
        """The paper's configuration: selection at ``sparse_start`` and mid-stack, per query head, dense
        selection layers."""
        return cls(top_k=top_k, selection_layers="paper", per_kv_head=False, sparse_selection_output=False,
                   score_dtype=None, score_fraction=1.0, **options)

    def check_model(self, spec: ModelSpec) -> None:
        """Selection layers and ``sparse_start`` must exist in this model: checked before export."""
        self.resolve_layers(spec.num_layers)

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The selection layers for a model of ``num_layers``; out-of-range choices are errors."""
        if self.sparse_start >= num_layers:
            raise PassError(f"tidaldecode: sparse_start={self.sparse_start} but the model has {num_layers} layers")
        layers = self.selection_layers
        if isinstance(layers, str):
            layers = named_selection_layers(layers, num_layers, self.sparse_start)
        bad = [layer for layer in layers if layer >= num_layers]
        if bad:
            raise PassError(f"tidaldecode: selection layer {bad[0]} is out of range (the model has {num_layers} layers)")
        return layers

    def run(self, graph: TokenGraph) -> PassResult:
        result = PassResult(self.name, graph)
        sites = graph.sites().attention
        if any(graph.node(s.node).target in METHOD_OPS for s in sites):
            result.counts["already_applied"] = 1
            return result
        selection = self.placed_selection_layers(sites)
        if self.sparse_start not in selection and not any(s.window for s in sites if s.layer == self.sparse_start):
            raise PassError(f"tidaldecode: layer sparse_start={self.sparse_start} must be a selection layer "
                            f"(got {sorted(selection)}): the first sparse layer needs a selection to read")
        form = self._form(graph, sites, result)
        if result.misses:  # all or nothing: a half-rewritten stack would read selections that never ran
            result.applicable = False
            return result
        slots = None
        for site in sites:
            node = graph.node(site.node)
            window = site_window(graph, site)
            if site.layer < self.sparse_start or window or slots is None and site.layer not in selection:
                result.counts["windowed_dense_layers" if window else "dense_layers"] += 1
                continue
            args = (graph.node(site.query), graph.node(site.key), graph.node(site.value))
            if form == EXPLICIT_FORM:
                args = (*args, graph.node(site.mask) if site.mask else None)
            if site.layer in selection:
                slots = self._selection(graph, node, args, site, form[0])
                result.counts["selection_layers"] += 1
            else:
                new = replace_node(graph, node, form[1], (*args, slots, site.scale, site.layer, site.softcap),
                                   self.name)
                result.replaced[node.name] = new.name
                result.counts["sparse_layers"] += 1
        if form == EXPLICIT_FORM:  # the runtime cache is the usual case; say when it is not
            result.counts["explicit_cache"] = 1
        if self.correction_interval:
            graph.add_policy(PolicySpec.of(CORRECTION_POLICY, interval=self.correction_interval))
        result.modified = True
        return result

    def _form(self, graph: TokenGraph, sites: list[AttentionSite], result: PassResult) -> tuple:
        """The ops the rewrite uses: the runtime-cache ones on a lowered graph, else the explicit-cache
        ones (``passes/explicit_cache.py``), which cannot re-encode tokens for cache correction. Why
        neither applies goes into ``result.misses``."""
        form, result.misses = cache_form(graph, sites)
        if form == EXPLICIT and self.correction_interval and not result.misses:
            result.misses = [Miss(graph.label, "the runtime KV cache", "correction_interval re-encodes tokens in the "
                                  "runtime's cache; lower the graph (lower=True) or leave correction_interval unset")]
        return EXPLICIT_FORM if form == EXPLICIT else CACHED_FORM

    def placed_selection_layers(self, sites) -> set[int]:
        """The selection layers, each windowed one moved up to the next full-attention layer (windowed
        layers stay windowed-dense, and a selection must come from a layer that sees the whole cache)."""
        windowed = {s.layer for s in sites if s.window}
        full = sorted(s.layer for s in sites if not s.window)
        placed = set()
        for layer in self.resolve_layers(len(sites)):
            if layer in windowed:
                layer = next((f for f in full if f > layer), None)
            if layer is not None:
                placed.add(layer)
        return placed

    def ensures(self, graph: TokenGraph) -> list[Miss]:
        """Sparse attention holds once some selection layer exists (tiny models may have no sparse layer)."""
        selections = (selection_attention_op, explicit_selection_op)
        if any(graph.node(s.node).target in selections for s in graph.sites().attention):
            return []
        return [Miss(graph.label, "selection layer present", "no layer was rewritten into a selection layer")]

    @staticmethod
    def _state_layers(graph: TokenGraph, layer: int) -> tuple[int, ...]:
        """The layers holding the ranking copy so far, plus ``layer`` (one state declaration covers all)."""
        declared = next((s.layers for s in graph.slot_states if s.name == SCORE_KEYS), ())
        return tuple(sorted({*declared, layer}))

    def ranking_options(self, head_dim: int) -> tuple[torch.dtype | None, int]:
        """The selection op's ``score_dtype`` and ``score_channels`` (0: all): ``score_fraction`` of
        ``head_dim``, at least one. Dense selection layers score exactly in their attention pass."""
        if not self.sparse_selection_output:
            return None, 0
        channels = max(1, round(self.score_fraction * head_dim))
        dtype = None if self.score_dtype is None else getattr(torch, self.score_dtype)
        return dtype, 0 if channels >= head_dim else channels

    def _selection(self, graph: TokenGraph, node, args, site, op):
        """Replace ``node`` by a selection op; its users read element 0, later layers element 1 (slots).
        On the runtime cache, a ranking approximation is declared as the per-slot state the cache keeps
        for it (the explicit-cache op reads the keys' channels directly)."""
        score_dtype, channels = self.ranking_options(site.head_dim)
        if op == selection_attention_op and (score_dtype is not None or channels):
            dtype = None if score_dtype is None else str(score_dtype).replace("torch.", "")
            graph.declare_slot_state(SlotState(SCORE_KEYS, layers=self._state_layers(graph, site.layer),
                                               trailing=(site.head_dim,), dtype=dtype, layout="channel_major",
                                               source="keys"))
        args = (*args, site.scale, site.layer, self.top_k, self.per_kv_head, self.sparse_selection_output,
                score_dtype, channels, site.softcap)
        _, slots = replace_with_pair(graph, node, op, args, self.name)
        return slots
