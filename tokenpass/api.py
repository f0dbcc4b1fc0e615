"""``tokenpass.optimize``: capture -> passes -> runtime, the library's front door."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

from torch import nn

from tokenpass.errors import PassError, TokenpassError
from tokenpass.ir.capture import PHASES, export_phase, model_name, probe
from tokenpass.ir.capture_train import TRAIN, export_train
from tokenpass.ir.graph import CAPTURED_PROPERTIES, TokenGraph
from tokenpass.passes import Pass, PassManager, PassResult
from tokenpass.passes.registry import make_pass
from tokenpass.progress import status
from tokenpass.runtime.model import OptimizedModel


class TokenpassWarning(UserWarning):
    """A pass that could not apply; the model still runs exactly, without it."""


ALL_PHASES: tuple[str, ...] = (*PHASES, TRAIN)


def capture(
    model: nn.Module, phases: Sequence[str] | None = None, name: str | None = None, passes: Sequence[Pass] = ()
) -> dict[str, TokenGraph]:
    """Export ``model``'s steps as ``TokenGraph``s (the model itself is not modified, its training flag
    included): ``prefill`` and ``decode`` always unless ``phases`` says otherwise, and the ``train`` step
    (the forward with labels) when a pass targets it.

    ``passes`` are checked against the model's shape (``Pass.check_model``) between the cheap probe and
    the slow export, so an option the model rules out fails in seconds.
    """
    phases = default_phases(passes) if phases is None else tuple(phases)
    unknown = [phase for phase in phases if phase not in ALL_PHASES]
    if unknown:
        raise TokenpassError(f"unknown phase {unknown[0]!r}: choose from {', '.join(ALL_PHASES)}")
    name = name or model_name(model)
    with status(f"probing {name}"):
        spec = probe(model, name)
    for p in passes:
        p.check_model(spec)
    graphs = {}
    for phase in phases:
        with status(f"exporting {name} {phase} step with torch.export"):
            program = export_train(model, spec) if phase == TRAIN else export_phase(model, spec, phase)
            graphs[phase] = TokenGraph(program, phase, spec)
    return graphs


def default_phases(passes: Sequence[Pass]) -> tuple[str, ...]:
    """The inference steps, and the training step when some pass rewrites nothing else. A pass that
    rewrites inference and training alike (an early-exit schedule) gets the train step when the caller names it."""
    return (*PHASES, TRAIN) if any(tuple(p.phases) == (TRAIN,) for p in passes) else PHASES


LOWER_FIRST = ["canonicalize_attention", "lower_kv_cache"]
CLEAN_UP = ["eliminate_noops", "dce", "select_logit_rows"]


def pipeline(passes: Sequence[Pass], lower: bool) -> list["str | Pass"]:
    """The full pass list: attention canonicalised and moved onto the runtime cache, the user's passes
    (which rewrite those runtime ops), then clean-up, then the passes that gate whole layers (later
    rewrites cannot see into the gated blocks, so these take the cleaned-up graph). Every added pass is idempotent, so listing them explicitly as well
    does no harm.
    """
    first, last = [p for p in passes if not p.runs_last], [p for p in passes if p.runs_last]
    return [*LOWER_FIRST, *first, *CLEAN_UP, *last] if lower else first + last


def plan(passes: "Sequence[str | Pass | type[Pass]]", lower: bool = True, verify: bool = False
         ) -> tuple[list[Pass], PassManager]:
    """The caller's passes and the manager running the full pipeline, with every name, option and the
    pass order checked: all that can fail without the model fails here, before any work."""
    requested = user_passes(passes)
    manager = PassManager(pipeline(requested, lower), verify=verify)
    manager.check_order(set(CAPTURED_PROPERTIES))
    return requested, manager


def check_passes(model: nn.Module, pass_lists: "Sequence[Sequence[str | Pass | type[Pass]]]", lower: bool = True,
                 name: str | None = None) -> None:
    """Check several pass lists against ``model`` at once (names, options, order, then the model's shape
    after one cheap probe): a benchmark refuses a bad configuration before it runs the good ones."""
    checked = [plan(passes, lower)[0] for passes in pass_lists]
    name = name or model_name(model)
    with status(f"probing {name}"):
        spec = probe(model, name)
    for requested in checked:
        for p in requested:
            p.check_model(spec)


def user_passes(passes: "Sequence[str | Pass | type[Pass]]") -> list[Pass]:
    """Build the caller's passes up front, so a bad name or option fails before any capture work."""
    if isinstance(passes, (str, Pass)) or isinstance(passes, type):
        raise TokenpassError(f"passes must be a list of pass names or Pass objects, got {passes!r}; "
                             f"did you mean passes=[{passes!r}]?")
    return [make_pass(p) for p in passes]


def optimize(
    model: nn.Module,
    passes: "Sequence[str | Pass | type[Pass]]" = (),
    verify: bool = False,
    name: str | None = None,
    lower: bool = True,
    compile: bool = False,
    phases: Sequence[str] | None = None,
) -> OptimizedModel:
    """Capture ``model``, run ``passes`` (names, ``Pass`` objects or classes) on each phase's graph, return a
    runnable model.

    ``phases``: the steps to capture (default: ``prefill`` and ``decode``, plus ``train`` when a pass such
    as ``CutCrossEntropy`` rewrites the training step; ``phases=["train"]`` skips the inference steps).
    A model with a ``train`` graph trains in a plain loop: ``model(input_ids, labels=labels).loss.backward()``
    fills the original parameters' gradients.

    ``lower=True`` (the default) runs the passes on graphs lowered onto the runtime's KV cache; ``lower=False``
    runs exactly ``passes`` on the captured graphs. With ``verify=True`` every exact pass is checked for
    unchanged outputs on sample inputs. ``compile=True`` runs the steps compiled (``OptimizedModel.compiled``:
    torch.compile per shape bucket, first-call costs in ``compile_report``).

    Never silently wrong: a model the lowering cannot handle runs as captured (exact) with a
    ``TokenpassWarning`` naming the layer and the reason; a pass the caller asked for that applies on no
    graph raises ``PassError`` with its reason.
    """
    requested, _ = plan(passes, lower, verify)
    return optimize_graphs(capture(model, phases=phases, name=name, passes=requested), requested, verify=verify,
                           lower=lower, compile=compile)


def optimize_graphs(
    graphs: dict[str, TokenGraph], passes: "Sequence[str | Pass | type[Pass]]" = (), verify: bool = False,
    lower: bool = True, compile: bool = False,
) -> OptimizedModel:
    """``optimize`` on graphs captured already (rewritten in place: pass ``fork(graphs)`` to keep them)."""
    requested, manager = plan(passes, lower, verify)
    reports = {}
    for phase, graph in graphs.items():
        with status(f"running passes on the {phase} graph"):
            reports[phase] = manager.run(graph)
    check_requested(requested, reports)
    if lower:
        warn_not_lowered(reports)
    spec = next(iter(graphs.values())).spec
    optimized = OptimizedModel(spec, graphs, reports)
    return optimized.compiled() if compile else optimized


def fork(graphs: dict[str, TokenGraph]) -> dict[str, TokenGraph]:
    """Independent copies of captured graphs for another pass list, sharing the (unmodified) weights:
    capturing once and forking is how one process compares configurations without re-exporting."""
    weights = {id(t): t for graph in graphs.values() for t in (*graph.program.state_dict.values(),
                                                                *graph.program.constants.values())}
    return copy.deepcopy(graphs, memo=dict(weights))


def check_requested(requested: list[Pass], reports: dict[str, list[PassResult]]) -> None:
    """Raise if a pass the caller named did its job on no graph it targets (naming the first reason)."""
    for p in requested:
        ran = [r for rs in reports.values() for r in rs if r.pass_name == p.name]
        if ran and all(r.phase_skipped for r in ran):
            raise PassError(f"pass '{p.name}' rewrites the {'/'.join(p.phases)} step, which was not captured "
                            f"(captured: {', '.join(reports)})")
        results = [r for r in ran if not r.phase_skipped]
        failures = [f"{r.graph.label}: {r.failure()}" for r in results if r.failure()]
        if results and len(failures) == len(results):
            raise PassError(f"pass '{p.name}' could not apply: {failures[0]}")


def warn_not_lowered(reports: dict[str, list[PassResult]]) -> None:
    """Warn once per graph whose attention stays on explicit cache tensors (exact, but slower), with the
    first reason in the lowering chain (a site canonicalisation could not recognise, a mask the runtime
    cannot reproduce, ...)."""
    for results in reports.values():
        lowering = next((r for r in results if r.pass_name == "lower_kv_cache"), None)
        if lowering is None or not lowering.failure():
            continue
        reason = next(r.failure() for r in results if r.pass_name in LOWER_FIRST and r.failure())
        warnings.warn(f"{lowering.graph.label} runs without the runtime KV cache (exact, slower; method passes "
                      f"cannot apply): {reason}", TokenpassWarning, stacklevel=3)
