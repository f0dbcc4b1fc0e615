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

from tokenpass.ir.capture import PHASES
from tokenpass.ir.graph import TokenGraph
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

    def __post_init__(self) -> None:
        """Dataclass passes: option types checked at construction, then the pass's own ``validate``."""
        check_options(self, self.name)
        self.validate()

    def validate(self) -> None:
        """Refuse option values the annotations admit but the pass cannot use (raise ``PassError``)."""

    def __call__(self, graph: TokenGraph) -> PassResult:
        if graph.phase is not None and graph.phase not in self.phases:
            return PassResult(self.name, graph, skipped=f"applies to {'/'.join(self.phases)} only", phase_skipped=True)
        before = graph.node_names()
        result = self.run(graph)
        if result.modified:
            graph.mark_changed()
        after = graph.node_names()
        result.added, result.removed = sorted(after - before), sorted(before - after)
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
