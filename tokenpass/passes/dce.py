"""Dead-code elimination: drop nodes whose results nothing uses (e.g. head repeats after canonicalisation)."""

from __future__ import annotations

from tokenpass.ir.graph import TokenGraph
from tokenpass.passes.base import Pass, PassResult
from tokenpass.passes.registry import register


@register
class DeadCodeElimination(Pass):
    name = "dce"
    exact = True
    provides = frozenset({"dead_code_free"})

    def run(self, graph: TokenGraph) -> PassResult:
        result = PassResult(self.name, graph)
        before = len(graph.graph.nodes)
        # fx keeps impure nodes (asserts, in-place ops) and graph inputs, which an exported program needs.
        result.modified = graph.graph.eliminate_dead_code()
        result.counts["nodes_removed"] = before - len(graph.graph.nodes)
        return result
