"""``tokenpass.optimize``: capture -> passes -> runtime, the library's front door."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from tokenpass.ir.capture import PHASES, export_phase, model_name, probe
from tokenpass.ir.graph import TokenGraph
from tokenpass.passes import Pass, PassManager
from tokenpass.progress import status
from tokenpass.runtime.model import OptimizedModel


def capture(model: nn.Module, phases: Sequence[str] = PHASES, name: str | None = None) -> dict[str, TokenGraph]:
    """Export ``model``'s prefill and decode steps as ``TokenGraph``s (the model itself is not modified)."""
    name = name or model_name(model)
    with status(f"probing {name}"):
        spec = probe(model, name)
    graphs = {}
    for phase in phases:
        with status(f"exporting {name} {phase} step with torch.export"):
            graphs[phase] = TokenGraph(export_phase(model, spec, phase), phase, spec)
    return graphs


LOWER_FIRST = ["canonicalize_attention", "lower_kv_cache"]
CLEAN_UP = ["eliminate_noops", "dce", "select_logit_rows"]


def pipeline(passes: Sequence["str | Pass"], lower: bool) -> list["str | Pass"]:
    """The full pass list: attention canonicalised and moved onto the runtime cache, the user's passes
    (which rewrite those runtime ops), then clean-up. Every added pass is idempotent, so listing them
    explicitly as well does no harm.
    """
    return [*LOWER_FIRST, *passes, *CLEAN_UP] if lower else list(passes)


def optimize(
    model: nn.Module,
    passes: Sequence["str | Pass"] = (),
    verify: bool = False,
    name: str | None = None,
    lower: bool = True,
) -> OptimizedModel:
    """Capture ``model``, run ``passes`` (names or ``Pass`` objects) on each phase's graph, return a runnable model.

    ``lower=True`` (the default) runs the passes on graphs lowered onto the runtime's KV cache; ``lower=False`` runs exactly ``passes`` on the captured graphs. With ``verify=True`` every exact
    pass is checked for unchanged outputs on sample inputs.
    """
    manager = PassManager(pipeline(passes, lower), verify=verify)
    graphs = capture(model, name=name)
    reports = {}
    for phase, graph in graphs.items():
        with status(f"running passes on the {phase} graph"):
            reports[phase] = manager.run(graph)
    spec = next(iter(graphs.values())).spec
    return OptimizedModel(spec, graphs, reports)
