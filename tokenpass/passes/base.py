"""The pass contract: what a pass declares, what it returns, and how it explains a non-match.

Modelled on onnx-ir's pass infrastructure: a pass declares the graph properties it ``requires``,
``provides`` and ``invalidates`` so a ``PassManager`` can reject a bad order before running anything,
and every pattern miss is reported with the site and the check that failed instead of passing silently.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from tokenpass.ir.capture import PHASES
from tokenpass.ir.graph import TokenGraph


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
    applicable: bool = True
    skipped: str | None = None  # why the pass did not run on this graph at all

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
            "misses": [asdict(m) for m in self.misses],
        }


class Pass(ABC):
    """A graph rewrite. Subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str]
    exact: ClassVar[bool]  # exact passes must leave every output numerically unchanged
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    phases: ClassVar[tuple[str, ...]] = PHASES

    def __call__(self, graph: TokenGraph) -> PassResult:
        if graph.phase is not None and graph.phase not in self.phases:
            return PassResult(self.name, graph, skipped=f"applies to {'/'.join(self.phases)} only")
        before = graph.node_names()
        result = self.run(graph)
        if result.modified:
            graph.mark_changed()
        after = graph.node_names()
        result.added, result.removed = sorted(after - before), sorted(before - after)
        graph.properties = (graph.properties - self.invalidates) | self.provides
        return result

    @abstractmethod
    def run(self, graph: TokenGraph) -> PassResult:
        """Rewrite ``graph`` in place; return counts, replacements and misses."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
