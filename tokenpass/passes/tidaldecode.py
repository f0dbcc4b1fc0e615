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
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from tokenpass.errors import PassError
from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.ops import cached_attention_op, selection_attention_op, sparse_attention_op
from tokenpass.passes.base import Miss, Pass, PassResult
from tokenpass.passes.registry import register
from tokenpass.passes.rewrite import replace_node

# The paper's scripts re-select at layer 13 of Llama-3-8B's 32 layers.
PAPER_RESELECT_FRACTION = 13 / 32


SCORE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def score_dtype_option(value: str | None) -> torch.dtype | None:
    """``bfloat16``/``float16``/``float32`` or ``None``/``"none"`` (the cache's own dtype)."""
    if value is None or value == "none":
        return None
    if value not in SCORE_DTYPES:
        raise PassError(f"tidaldecode: score_dtype {value!r} is not one of {', '.join(SCORE_DTYPES)} or none")
    return SCORE_DTYPES[value]


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
class TidalDecode(Pass):
    name = "tidaldecode"
    exact = False
    requires = frozenset({"runtime_kv_cache"})
    provides = frozenset({"sparse_attention"})
    phases = ("decode",)

    def __init__(
        self,
        top_k: int = 1024,
        sparse_start: int = 2,
        selection_layers: Sequence[int] | str = "every2",
        per_kv_head: bool = True,
        sparse_selection_output: bool = True,
        correction_interval: int | None = None,
        score_dtype: str | None = None,
        score_fraction: float = 0.25,
    ):
        """Defaults: the configuration tuned on SmolLM2 (docs/benchmarks.md): re-select at every second
        layer, one selection per KV head (its query heads vote), selection layers reading values only at
        their own selection and ranking with a quarter of each key's channels. ``TidalDecode.paper()``
        gives the paper's configuration. ``score_dtype`` and ``score_fraction`` have no effect on dense
        selection layers (``sparse_selection_output=False``): their attention pass yields exact scores."""
        if not isinstance(top_k, int) or top_k < 1:
            raise PassError(f"tidaldecode: top_k must be a positive integer, got {top_k!r}")
        if not isinstance(sparse_start, int) or sparse_start < 0:
            raise PassError(f"tidaldecode: sparse_start must be a non-negative integer, got {sparse_start!r}")
        if isinstance(selection_layers, int):
            selection_layers = [selection_layers]
        if isinstance(selection_layers, str):
            check_set_name(selection_layers)
        elif selection_layers is not None:
            layers = list(selection_layers)
            if not layers or any(b <= a for a, b in zip(layers, layers[1:])):
                raise PassError(f"tidaldecode: selection_layers must be a non-empty increasing list, got {layers}")
            if layers[0] < sparse_start:
                raise PassError(
                    f"tidaldecode: selection layer {layers[0]} is below sparse_start={sparse_start}; "
                    "layers below sparse_start are dense"
                )
        if correction_interval is not None and (not isinstance(correction_interval, int) or correction_interval < 2):
            raise PassError(f"tidaldecode: correction_interval must be an integer >= 2, got {correction_interval!r}")
        self.correction_interval = correction_interval
        self.score_dtype = score_dtype_option(score_dtype)
        if not isinstance(score_fraction, (int, float)) or not 0 < score_fraction <= 1:
            raise PassError(f"tidaldecode: score_fraction must be in (0, 1], got {score_fraction!r}")
        self.score_fraction = float(score_fraction)
        self.top_k = top_k
        self.sparse_start = sparse_start
        self.selection_layers = selection_layers if isinstance(selection_layers, str) else list(selection_layers)
        self.per_kv_head = per_kv_head
        self.sparse_selection_output = sparse_selection_output

    @classmethod
    def paper(cls, top_k: int = 256, **options) -> "TidalDecode":
        """The paper's configuration: selection at ``sparse_start`` and mid-stack, per query head, dense
        selection layers."""
        return cls(top_k=top_k, selection_layers="paper", per_kv_head=False, sparse_selection_output=False,
                   score_dtype=None, score_fraction=1.0, **options)

    def __repr__(self) -> str:
        return (f"TidalDecode(top_k={self.top_k}, sparse_start={self.sparse_start}, "
                f"selection_layers={self.selection_layers}, per_kv_head={self.per_kv_head}, "
                f"sparse_selection_output={self.sparse_selection_output}, correction_interval={self.correction_interval}, "
                f"score_dtype={str(self.score_dtype).replace('torch.', '')}, score_fraction={self.score_fraction})")

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
        ops = {graph.node(s.node).target for s in sites}
        if ops & {selection_attention_op, sparse_attention_op}:
            result.counts["already_applied"] = 1
            return result
        selection = set(self.resolve_layers(len(sites)))
        if self.sparse_start not in selection:
            raise PassError(f"tidaldecode: layer sparse_start={self.sparse_start} must be a selection layer "
                            f"(got {sorted(selection)}): the first sparse layer needs a selection to read")
        slots = None
        for site in sites:
            node = graph.node(site.node)
            if site.layer < self.sparse_start:
                result.counts["dense_layers"] += 1
                continue
            if node.target != cached_attention_op:
                result.misses.append(Miss(site.label, "attention on the runtime cache",
                                          f"op is {site.op}; run lower_kv_cache first"))
                return result
            args = (graph.node(site.query), graph.node(site.key), graph.node(site.value))
            if site.layer in selection:
                slots = self._selection(graph, node, args, site.scale, site.layer, site.head_dim)
                result.counts["selection_layers"] += 1
            else:
                new = replace_node(graph, node, sparse_attention_op, (*args, slots, site.scale, site.layer), self.name)
                result.replaced[node.name] = new.name
                result.counts["sparse_layers"] += 1
        if self.correction_interval:
            graph.runtime_options["correction_interval"] = self.correction_interval
        result.modified = True
        return result

    def ranking_options(self, head_dim: int) -> tuple[torch.dtype | None, int]:
        """The selection op's ``score_dtype`` and ``score_channels`` (0: all): ``score_fraction`` of
        ``head_dim``, at least one. Dense selection layers score exactly in their attention pass."""
        if not self.sparse_selection_output:
            return None, 0
        channels = max(1, round(self.score_fraction * head_dim))
        return self.score_dtype, 0 if channels >= head_dim else channels

    def _selection(self, graph: TokenGraph, node, args, scale: float, layer: int, head_dim: int):
        """Replace ``node`` by a selection op; its users read element 0, later layers element 1 (slots)."""
        with graph.graph.inserting_before(node):
            select = graph.graph.call_function(
                selection_attention_op,
                (*args, scale, layer, self.top_k, self.per_kv_head, self.sparse_selection_output,
                 *self.ranking_options(head_dim)),
            )
            out = graph.graph.call_function(operator.getitem, (select, 0))
            slots = graph.graph.call_function(operator.getitem, (select, 1))
        for key in ("nn_module_stack", "stack_trace"):
            if key in node.meta:
                select.meta[key] = node.meta[key]
        out.meta.update(node.meta)
        for new in (select, out, slots):
            new.meta["tokenpass"] = {"pass": self.name, "replaces": node.name}
        node.replace_all_uses_with(out)
        graph.graph.erase_node(node)
        return slots
