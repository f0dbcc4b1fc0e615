"""Run a pass list over a graph: order checked up front, failures named, exact passes optionally verified."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenpass.errors import PassError, PassOrderError, TokenpassError
from tokenpass.ir.capture import sample_inputs
from tokenpass.ir.capture_train import TRAIN, train_sample_inputs
from tokenpass.ir.graph import TokenGraph
from tokenpass.passes.base import Pass, PassResult
from tokenpass.passes.registry import make_pass, providers
from tokenpass.runtime.executor import run_captured

# Exact passes are exact in real arithmetic; float reassociation (another kernel, another summation
# order) may move outputs by a few ulps per layer, so the bound scales with the output's magnitude.
VERIFY_ATOL = 1e-5
VERIFY_RTOL = 1e-4


class PassManager:
    """Runs passes in order on a ``TokenGraph``.

    ``verify=True`` lints the graph after every pass and, for passes declared ``exact``, runs the graph
    before and after on sample inputs and refuses any change in its outputs.
    """

    def __init__(self, passes: Sequence["str | Pass"], verify: bool = False):
        self.passes = [make_pass(p) for p in passes]
        self.verify = verify

    def check_order(self, available: set[str]) -> None:
        """Raise ``PassOrderError`` if a pass requires a property no earlier pass (or capture) provides."""
        props = set(available)
        for i, p in enumerate(self.passes):
            missing = sorted(p.requires - props)
            if missing:
                earlier = ", ".join(q.name for q in self.passes[:i]) or "none"
                fixes = "; ".join(f"'{m}' is provided by {', '.join(providers(m)) or 'no registered pass'}" for m in missing)
                raise PassOrderError(
                    f"pass '{p.name}' requires {', '.join(missing)}, which no earlier pass provides "
                    f"(earlier passes: {earlier}); {fixes}: run that before '{p.name}'"
                )
            props = (props - p.invalidates) | p.provides

    def run(self, graph: TokenGraph) -> list[PassResult]:
        self.check_order(graph.properties)
        results: list[PassResult] = []
        for p in self.passes:
            if graph.phase is not None and graph.phase not in p.phases:  # before requirements: not its graph
                results.append(p(graph))
                continue
            unmet = self._unmet_requirement(p, graph, results)
            if unmet is not None:
                results.append(PassResult(p.name, graph, applicable=False, skipped=unmet))
                continue
            reference = self._reference_outputs(graph) if self.verify and p.exact else None
            try:
                result = p(graph)
            except Exception as exc:  # noqa: BLE001 - re-raised with the pass and its predecessors named
                raise PassError(f"pass '{p.name}' failed on {graph.label}{self._after(results)}: {_one_line(exc)}") from exc
            if self.verify and result.modified:
                self._verify(p, graph, reference, results)
            results.append(result)
        return results

    def _unmet_requirement(self, p: Pass, graph: TokenGraph, results: list[PassResult]) -> str | None:
        """Why ``p`` cannot run: a required property an earlier pass declares but did not grant here."""
        missing = sorted(p.requires - graph.properties)
        if not missing:
            return None
        why = [f"{r.pass_name} did not provide it: {r.failure()}" for q, r in zip(self.passes, results)
               if set(missing) & q.provides and r.failure()]
        return f"requires {', '.join(missing)}; " + ("; ".join(why) or "no earlier pass provided it on this graph")

    @staticmethod
    def _after(results: list[PassResult]) -> str:
        return f" (after {', '.join(r.pass_name for r in results)})" if results else " (first pass)"

    @staticmethod
    def _reference_outputs(graph: TokenGraph):
        if graph.spec is None or graph.phase is None:
            return None
        inputs = train_sample_inputs(graph.spec) if graph.phase == TRAIN else sample_inputs(graph.spec, graph.phase)
        return inputs, run_captured(graph, inputs)

    def _verify(self, p: Pass, graph: TokenGraph, reference, results: list[PassResult]) -> None:
        try:
            graph.graph.lint()
        except Exception as exc:  # noqa: BLE001
            raise PassError(f"pass '{p.name}' left an invalid graph in {graph.label}{self._after(results)}: {exc}")
        if reference is None:
            return
        inputs, expected = reference
        got = run_captured(graph, inputs)
        for index, (a, b) in enumerate(zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got))):
            if b is None:  # an output the pass drops (cutcrossentropy's logits): nothing left to compare
                continue
            if a.shape != b.shape:
                raise PassError(f"exact pass '{p.name}' changed output {index} of {graph.label}{self._after(results)}"
                                f": shape {tuple(a.shape)} -> {tuple(b.shape)}")
            diff = (a - b).abs().max().item() if a.numel() else 0.0
            allowed = VERIFY_ATOL + VERIFY_RTOL * (a.abs().max().item() if a.numel() else 0.0)
            if not diff <= allowed:
                raise PassError(
                    f"exact pass '{p.name}' changed output {index} of {graph.label}{self._after(results)}: "
                    f"max abs diff {diff:.3g} (allowed {allowed:.3g})"
                )


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, TokenpassError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
