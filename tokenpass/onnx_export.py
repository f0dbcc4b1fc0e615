"""``tokenpass.export_onnx``: a model's prefill and decode steps, after passes, as ONNX files that stock
onnxruntime runs (``tokenpass.OnnxModel`` runs them with the torch runtime's generation loop).

Each captured step already carries its KV cache as explicit inputs and outputs (``ir/capture.py``), so
exporting is ``torch.onnx.export`` (the dynamo exporter) of each step's ``ExportedProgram``, with the
batch, token and past axes dynamic and the outputs named ``logits``/``present_keys_<l>``/
``present_values_<l>``. A directory holds both steps and a manifest::

    out/prefill.onnx    T >= 2 new tokens on a past of any length (0 included)
    out/decode.onnx     one new token on a past of any length
    out/tokenpass_onnx.json

tokenpass's own ops export through their translations (``ir/onnx_translations.py``: standard ONNX ops,
inlined; the canonical attention op has one). Passes that rewrite attention onto the runtime's own KV
cache (``requires: runtime_kv_cache``) and ops without a translation are refused in one line naming the
pass, the node and the op, before any export work, rather than exported into a file that runs
differently.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tokenpass.api import optimize, user_passes
from tokenpass.errors import TokenpassError
from tokenpass.ir.capture import PHASES
from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.onnx_translations import onnx_translations
from tokenpass.passes import Pass
from tokenpass.passes.lower_kv_cache import LowerKVCache
from tokenpass.progress import steps as progress
from tokenpass.runtime.model import OptimizedModel
from tokenpass.runtime.onnx_session import MANIFEST, OnnxManifest, output_names, phase_file

OPSET = 18  # what torch's ONNX library is written in: exported as is, no version conversion


class ExportError(TokenpassError):
    """A model or pass list that cannot become ONNX files (yet), with the reason."""


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote."""

    directory: Path
    files: dict[str, Path] = field(default_factory=dict)
    passes: list[str] = field(default_factory=list)
    opset: int | None = None


def export_onnx(model: "nn.Module | OptimizedModel", path: str | Path,
                passes: "Sequence[str | Pass | type[Pass]]" = (), force: bool = False,
                check: bool = True) -> OnnxExport:
    """Write ``model``'s prefill and decode steps, after ``passes``, to the directory ``path``.

    ``model``: an ``nn.Module`` causal LM (captured here, ``passes`` applied without lowering onto the
    runtime cache) or an ``OptimizedModel`` made with ``lower=False`` (its graphs as they are; ``passes``
    must then be empty). ``force``: replace an existing export. ``check``: run ONNX's full checker
    (types and shapes inferred through every node) on each file."""
    target = Path(path)
    _check_target(target, force)
    graphs, names = _graphs(model, passes)
    for graph in graphs.values():
        check_exportable(graph)
    staging = target.with_name(target.name + ".partial")  # the target changes only once all of it is written
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        opset = _write_steps(graphs, staging, check)
        OnnxManifest.of(next(iter(graphs.values())).spec, names, opset).write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return OnnxExport(target, {p: target / phase_file(p) for p in PHASES}, names, opset)


def _write_steps(graphs: dict[str, TokenGraph], directory: Path, check: bool) -> int | None:
    """Each step's ONNX file in ``directory``; returns the opset written."""
    opset = None
    for phase in progress(PHASES, f"exporting {graphs[PHASES[0]].label.split('/')[0]} to ONNX"):
        program = _onnx_program(graphs[phase])
        opset = program.model.opset_imports.get("", None)
        path = directory / phase_file(phase)
        program.save(str(path))
        if check:
            _full_check(path)
    return opset


def _check_target(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise ExportError(f"{target} exists; pass force=True (--force) to replace it")
    if target.exists() and not (target.is_dir() and (target / MANIFEST).is_file()):
        raise ExportError(f"{target} exists and is not a tokenpass ONNX export; refusing to replace it")


def _graphs(model: "nn.Module | OptimizedModel", passes: Sequence) -> tuple[dict[str, TokenGraph], list[str]]:
    """The steps to export and the names of the passes they went through."""
    if isinstance(model, OptimizedModel):
        if passes:
            raise ExportError("passes are applied when optimizing; export an OptimizedModel as it is, or pass "
                              "the original model with passes=[...]")
        if model.lowered:
            raise ExportError(f"{model.spec.name} runs on the runtime's KV cache (optimize(..., lower=True), the "
                              "default), which ONNX files cannot carry; export the original model with "
                              "passes=[...], or optimize it with lower=False")
        missing = [p for p in PHASES if p not in model.step_graphs]
        if missing:
            raise ExportError(f"{model.spec.name} has no {', '.join(missing)} graph to export")
        reports = model.reports.get(PHASES[0], [])
        return dict(model.step_graphs), [r.name for r in reports if getattr(r, "modified", False)]
    requested = user_passes(passes)
    for p in requested:
        if p.requires & LowerKVCache.provides:  # built on the runtime's own cache
            raise ExportError(f"pass '{p.name}' cannot export to ONNX yet: it rewrites attention onto the "
                              "runtime's KV cache (and its state between steps), which has no ONNX form here")
    optimized = optimize(model, requested, lower=False, phases=PHASES)
    return dict(optimized.step_graphs), [p.name for p in requested]


def check_exportable(graph: TokenGraph) -> None:
    """Refuse an op of tokenpass's own that has no ONNX translation (a method's runtime op, a layer gate),
    naming the node and the pass that made it."""
    translated = onnx_translations()
    for node in graph.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target.namespace != "aten" and node.target not in translated:
            made_by = (node.meta.get("tokenpass") or {}).get("pass", "a pass")
            raise ExportError(f"{graph.label}: node '{node.name}' ({node.target}, made by {made_by}) has no ONNX "
                              "form yet; export without that pass")


def _onnx_program(graph: TokenGraph):
    """``torch.onnx.export`` of one step, its outputs and dynamic axes named; the exporter's chatter is
    swallowed (its failures are not: they name the op it could not translate)."""
    chatter, exporter_log = io.StringIO(), logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # not "torchvision is not installed" on every export
    try:
        with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, inside the exporter
            program = torch.onnx.export(graph.program, dynamo=True, optimize=True, verbose=False, opset_version=OPSET,
                                        custom_translation_table=onnx_translations())
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; one line with its first line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(f"{graph.label}: torch.onnx.export failed: {type(exc).__name__}: {first}") from None
    finally:
        exporter_log.setLevel(level)
    _name_outputs(program.model.graph, graph.spec.num_layers)
    _name_dims(program.model.graph)
    return program


def _name_outputs(onnx_graph, num_layers: int) -> None:
    names = output_names(num_layers)
    if len(onnx_graph.outputs) != len(names):
        raise ExportError(f"the exported step returns {len(onnx_graph.outputs)} outputs, expected {len(names)}")
    for value, name in zip(onnx_graph.outputs, names):
        value.name = name


def _name_dims(onnx_graph) -> None:
    """Give the exporter's symbols (``s10``, ``s18 + 1``) the names users read: batch, tokens, past_tokens
    and total_tokens (the mask's length), learnt from where each symbol first appears. The mask's batch
    symbol is a different one in the trace (nothing there ties it to the ids'); it is the same axis."""
    inputs = {value.name: value for value in onnx_graph.inputs}
    axes = [("batch", "input_ids", 0), ("batch", "attention_mask", 0), ("tokens", "input_ids", 1),
            ("past_tokens", "past_keys_0", 2), ("total_tokens", "attention_mask", 1)]
    rename = {}
    for name, value, axis in axes:
        symbol = getattr(inputs[value].shape[axis], "value", None) if value in inputs else None
        if isinstance(symbol, str) and symbol not in rename:
            rename[symbol] = name
    if not rename:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, rename)) + r")\b")
    for value in (*onnx_graph.inputs, *onnx_graph.outputs):
        if value.shape is None:
            continue
        dims = [_renamed(dim, pattern, rename) for dim in value.shape]
        value.shape = type(value.shape)(dims)


def _renamed(dim, pattern: re.Pattern, rename: dict[str, str]):
    import onnx_ir as ir

    symbol = getattr(dim, "value", None)
    if not isinstance(symbol, str):
        return dim
    return ir.SymbolicDim(pattern.sub(lambda m: rename[m.group(1)], symbol))


def _full_check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - checker errors vary; one line naming the file
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(f"{path.name} fails ONNX's full check: {first}") from None
