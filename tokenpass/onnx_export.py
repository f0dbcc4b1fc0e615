"""``tokenpass.export_onnx``: a model's prefill and decode steps, after passes, as ONNX files that stock
onnxruntime runs (``tokenpass.OnnxModel`` runs them with the torch runtime's generation loop).

Each captured step already carries its KV cache as explicit inputs and outputs (``ir/capture.py``), so
exporting is ``torch.onnx.export`` (the dynamo exporter) of each step's ``ExportedProgram``, with the
batch, token and past axes dynamic and the outputs named ``logits``/``present_keys_<l>``/
``present_values_<l>``. A directory holds both steps and a manifest::

    out/prefill.onnx    T >= 2 new tokens on a past of any length (0 included)
    out/decode.onnx     one new token on a past of any length
    out/tokenpass_onnx.json   the cache layout, the passes and what each changed
    out/genai_config.json     onnxruntime-genai's config: the two files as a prompt / token pipeline
                              (not written when a method's policy must run between steps: genai would not)

A method whose state between steps is more than the standard cache (KV eviction: which slots each head
keeps) exports its steps on the explicit cache with extra per-layer outputs (``ir/step_outputs.py``)
and names its policy in the manifest; ``OnnxModel`` runs that policy between steps exactly as the torch
runtime's explicit session does.

tokenpass's own ops export through their translations (``ir/onnx_translations.py``: standard ONNX ops;
the canonical attention op has one), each call then outlined into a ``tokenpass``-domain function whose
body is those ops (``ir/onnx_outline.py``), so stock onnxruntime runs the file and readers see the ops.
Passes that rewrite attention onto the runtime's own KV cache (``requires: runtime_kv_cache``) and ops
without a translation are refused in one line naming the pass, the node and the op, before any export
work, rather than exported into a file that runs differently.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tokenpass.api import optimize, user_passes
from tokenpass.errors import TokenpassError
from tokenpass.ir.capture import PHASES
from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.onnx_outline import outline_tokenpass_ops
from tokenpass.ir.onnx_translations import onnx_translations
from tokenpass.passes import Pass, PassResult
from tokenpass.passes.canonicalize_attention import CanonicalizeAttention
from tokenpass.passes.lower_kv_cache import LowerKVCache
from tokenpass.progress import steps as progress
from tokenpass.runtime.genai_config import write_genai_config
from tokenpass.runtime.model import OptimizedModel
from tokenpass.runtime.onnx_session import MANIFEST, OnnxManifest, output_names, phase_file
from tokenpass.runtime.policy import policy_class

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
    check_target(target, force)
    optimized = _optimized(model, passes)
    graphs, names = {p: optimized.step_graphs[p] for p in PHASES}, passes_run(optimized.reports)
    for graph in graphs.values():
        check_exportable(graph)

    def write(staging: Path) -> int | None:
        opset = _write_steps(graphs, staging, check)
        policies = [p for graph in graphs.values() for p in graph.policies]
        outputs = {phase: list(graph.step_outputs) for phase, graph in graphs.items() if graph.step_outputs}
        OnnxManifest.of(optimized.spec, names, opset, pass_changes(optimized.reports), policies, outputs).write(staging)
        if not policies:  # onnxruntime-genai's generator would run the steps without the policies: wrong tokens
            write_genai_config(staging, optimized.spec, token_ids(model))
        return opset

    opset = write_export_directory(target, write)
    return OnnxExport(target, {p: target / phase_file(p) for p in PHASES}, names, opset)


def write_export_directory(target: Path, write: "Callable[[Path], int | None]") -> int | None:
    """Run ``write`` into a staging directory and move it to ``target`` only once all of it is written
    (an interrupted export leaves the previous one, or nothing); returns what ``write`` returns."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        result = write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return result


def _write_steps(graphs: dict[str, TokenGraph], directory: Path, check: bool) -> int | None:
    """Each step's ONNX file in ``directory``; returns the opset written."""
    opset = None
    for phase in progress(PHASES, f"exporting {graphs[PHASES[0]].label.split('/')[0]} to ONNX"):
        program = _onnx_program(graphs[phase])
        opset = program.model.opset_imports.get("", None)
        path = directory / phase_file(phase)
        program.save(str(path))
        if check:
            full_check(path)
    return opset


def check_target(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise ExportError(f"{target} exists; pass force=True (--force) to replace it")
    if target.exists() and not (target.is_dir() and (target / MANIFEST).is_file()):
        raise ExportError(f"{target} exists and is not a tokenpass ONNX export; refusing to replace it")


def token_ids(model: "nn.Module | OptimizedModel") -> dict[str, int | list[int]]:
    """``bos``/``eos``/``pad`` ids from a Hugging Face model's generation config, else its config (an
    ``OptimizedModel`` does not carry them: none)."""
    found: dict[str, int | list[int]] = {}
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        for name in ("bos", "eos", "pad"):
            value = getattr(source, f"{name}_token_id", None)
            if name not in found and (isinstance(value, int) or (isinstance(value, list) and value)):
                found[name] = value
    return found


def _optimized(model: "nn.Module | OptimizedModel", passes: Sequence) -> OptimizedModel:
    """The model whose steps are exported: ``model`` itself, or ``model`` captured and passed through
    ``passes`` without lowering onto the runtime cache."""
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
        return model
    return optimize(model, export_pipeline(user_passes(passes)), lower=False, phases=PHASES)


def pass_changes(reports: dict[str, list[PassResult]]) -> dict[str, dict[str, dict[str, int]]]:
    """Per step, per pass that changed it, its counts (the manifest's record of what each pass did)."""
    return {phase: {r.pass_name: dict(r.counts) for r in results if r.modified}
            for phase, results in reports.items() if phase in PHASES}


def passes_run(reports: dict[str, list[PassResult]]) -> list[str]:
    """The passes that changed some exported step, in pipeline order."""
    names: list[str] = []
    for phase in PHASES:
        names += [r.pass_name for r in reports.get(phase, []) if r.modified and r.pass_name not in names]
    return names


def export_pipeline(requested: list[Pass]) -> list[Pass]:
    """The passes an export runs: the caller's, after ``canonicalize_attention`` when one of them works on
    canonical attention and nothing earlier provides it. A pass built on the runtime's own KV cache is
    refused: its graph would read a cache the ONNX file does not have."""
    for p in requested:
        if p.requires & LowerKVCache.provides:
            raise ExportError(f"pass '{p.name}' cannot export to ONNX yet: it works on the runtime's own KV cache, "
                              "which an ONNX file does not have")
    canonical = CanonicalizeAttention.provides
    first = next((i for i, p in enumerate(requested) if p.requires & canonical), None)
    if first is None or any(p.provides & canonical for p in requested[:first]):
        return requested
    return [CanonicalizeAttention(), *requested]


def check_exportable(graph: TokenGraph) -> None:
    """Refuse an op of tokenpass's own that has no ONNX translation (a method's runtime op, a layer gate),
    naming the node and the pass that made it, and a graph that asks the runtime for per-slot state or a
    run-time policy on its own cache (ONNX files carry neither; a policy on the explicit cache travels in
    the manifest and the ONNX runtime runs it)."""
    runtime_policies = [p for p in graph.policies if not policy_class(p).explicit]
    if runtime_policies or graph.slot_states:
        needs = [f"run-time policy '{p.name}'" for p in runtime_policies] + \
                [f"per-slot cache state '{s.name}'" for s in graph.slot_states]
        raise ExportError(f"{graph.label}: the graph needs the runtime's {needs[0]}, which an ONNX file cannot "
                          "carry; export without the option that adds it")
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
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; one line with the root cause's
        cause = root_cause(exc)
        first = (str(cause).strip().splitlines() or [""])[0]
        raise ExportError(f"{graph.label}: torch.onnx.export failed: {type(cause).__name__}: {first}") from None
    finally:
        exporter_log.setLevel(level)
    _name_outputs(program.model.graph, graph.spec.num_layers, graph.step_outputs)
    _name_dims(program.model.graph)
    outline_tokenpass_ops(program.model)
    return program


def root_cause(exc: BaseException) -> BaseException:
    """The exception at the bottom of ``exc``'s chain: what a translation raised, not the exporter's wrapping
    of it (three layers of "Error when translating node ...")."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _name_outputs(onnx_graph, num_layers: int, groups: list[str]) -> None:
    names = output_names(num_layers, groups)
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


def full_check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - checker errors vary; one line naming the file
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(f"{path.name} fails ONNX's full check: {first}") from None
