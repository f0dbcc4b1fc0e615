"""The pass contract: what a pass declares, what it returns, and how it explains a non-match.

Modelled on onnx-ir's pass infrastructure: a pass declares the graph properties it ``requires``,
``provides`` and ``invalidates`` so a ``PassManager`` can reject a bad order before running anything,
and every pattern miss is reported with the site and the check that failed instead of passing silently.

A property is a guarantee later passes and the runtime rely on, so it is granted only when it holds:
after ``run``, ``ensures`` checks the graph, and a pass whose guarantee does not hold (it applied to
nothing, or to part of the graph) leaves its ``provides`` off the graph and says why. That is what
stops a graph that was never lowered from being run as if it were.

Options: a pass with options is a dataclass whose fields are the options; their annotations are
checked when the pass is built (``passes/options.py``), then ``validate`` checks what types cannot say.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import fx

from tokenpass.ir.capture import PHASES, ModelSpec
from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.sites import enclosing_layer, innermost_module
from tokenpass.passes.options import check_options


@dataclass(frozen=True)
class Miss:
    """A site a pass looked at and left alone, and why."""

    site: str
    check: str
    reason: str

    def __str__(self) -> str:
        return f"{self.site}: {self.check} failed: {self.reason}"


@dataclass
class PassResult:
    """What one pass did to one graph."""

    pass_name: str
    graph: TokenGraph
    modified: bool = False
    counts: Counter = field(default_factory=Counter)
    misses: list[Miss] = field(default_factory=list)
    replaced: dict[str, str] = field(default_factory=dict)  # old node -> new node
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    # Every added, removed or replaced node: its op, decoder layer, module and provenance (``node_info``).
    nodes: dict[str, dict] = field(default_factory=dict)
    applicable: bool = True
    skipped: str | None = None  # why the pass did not run on this graph at all
    phase_skipped: bool = False  # skipped because the pass targets other phases (not a failure)

    def failure(self) -> str | None:
        """Why the pass did not do its job on this graph, or None (applied, or not meant for this phase)."""
        if self.phase_skipped:
            return None
        if self.skipped:
            return self.skipped
        if not self.applicable:
            return str(self.misses[0]) if self.misses else "not applicable"
        return None

    def to_dict(self) -> dict:
        return {
            "name": self.pass_name,
            "graph": self.graph.label,
            "modified": self.modified,
            "applicable": self.applicable,
            "skipped": self.skipped,
            "counts": dict(self.counts),
            "replaced": dict(self.replaced),
            "added": list(self.added),
            "removed": list(self.removed),
            "nodes": dict(self.nodes),
            "misses": [asdict(m) for m in self.misses],
        }


def node_info(node: fx.Node) -> dict:
    """What a diff shows of a node: its op, the decoder layer and module it belongs to, and which pass
    made it from which node (``meta["tokenpass"]``, set by ``passes/rewrite.py``)."""
    layer = enclosing_layer(node)
    target = node.target
    op = (str(target) if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket)
          else getattr(target, "__name__", str(target))) if node.op == "call_function" else node.op
    return {
        "op": op,
        "layer": layer[0] if layer else None,
        "module": innermost_module(node),
        "made_by": node.meta.get("tokenpass"),
    }


class Pass(ABC):
    """A graph rewrite. Subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str]
    exact: ClassVar[bool]  # exact passes must leave every output numerically unchanged
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    phases: ClassVar[tuple[str, ...]] = PHASES
    # A pass that restructures the graph into control flow (layer blocks behind a run-time gate) hides
    # the nodes it moved from later rewrites; the pipeline runs such passes after the other method passes.
    runs_last: ClassVar[bool] = False

    def __post_init__(self) -> None:
        """Dataclass passes: option types checked at construction, then the pass's own ``validate``."""
        check_options(self, self.name)
        self.validate()

    def validate(self) -> None:
        """Refuse option values the annotations admit but the pass cannot use (raise ``PassError``)."""

    def for_training(self, prompt_tokens: int, window: int) -> "Pass":
        """This pass as fine-tuning applies it to windows of ``window`` tokens whose first
        ``prompt_tokens`` play the prompt (a schedule keyed on the prompt's end needs a fixed one).
        Default: unchanged."""
        return self

    def check_model(self, spec: ModelSpec) -> None:
        """Refuse options this model's shape rules out (raise ``PassError``), e.g. a layer it does not have.
        ``optimize`` calls it right after the cheap probe and before the slow export, so such a mistake
        costs seconds, not a capture. Default: nothing to check."""

    def __call__(self, graph: TokenGraph) -> PassResult:
        if graph.phase is not None and graph.phase not in self.phases:
            return PassResult(self.name, graph, skipped=f"applies to {'/'.join(self.phases)} only", phase_skipped=True)
        before = {node.name: node for node in graph.graph.nodes}
        result = self.run(graph)
        if result.modified:
            graph.mark_changed()
        after = {node.name: node for node in graph.graph.nodes}
        result.added, result.removed = sorted(after.keys() - before.keys()), sorted(before.keys() - after.keys())
        # Erased nodes keep their target and meta, so removed nodes can still be described.
        result.nodes = {name: node_info(after[name] if name in after else before[name])
                        for name in {*result.added, *result.removed, *result.replaced, *result.replaced.values()}
                        if name in after or name in before}
        graph.properties -= self.invalidates
        unmet = self.ensures(graph) if self.provides else []
        if unmet:
            result.applicable = False
            if not result.misses:  # the pass's own misses already say why; else the failed guarantee does
                result.misses.extend(unmet)
        else:
            graph.properties |= self.provides
        return result

    @abstractmethod
    def run(self, graph: TokenGraph) -> PassResult:
        """Rewrite ``graph`` in place; return counts, replacements and misses."""

    def ensures(self, graph: TokenGraph) -> list[Miss]:
        """Why ``provides`` does not hold on ``graph`` after ``run`` (empty: it holds). Passes that
        provide a property override this with a check of the graph itself, not of their own report."""
        return []

    def __repr__(self) -> str:  # dataclass passes get a repr listing their options
        return f"{type(self).__name__}()"
