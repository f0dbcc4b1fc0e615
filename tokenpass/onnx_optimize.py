"""``tokenpass.optimize_onnx``: passes applied to an ONNX decoder that someone else exported.

The file (e.g. plain ``torch.onnx.export`` of a Hugging Face model with its cache as inputs and outputs)
goes through the steps a torch model does, on ONNX graphs (onnx-ir)::

    load        one-line errors for a missing, corrupt or truncated file and an unsupported opset
    lower       onnxruntime's fused GroupQueryAttention spelled out around tokenpass.Attention
                (ir/foreign/contrib.py), so onnxruntime-genai's models are read like any other
    find        attention sites by what they compute (ir/foreign/sites.py); none is an error
    canonicalize  each site -> a tokenpass.Attention function call; the step's inputs and outputs renamed
                to tokenpass's (ir/foreign/interface.py); then *run* against the file as it came, and
                refused if it computes anything else (runtime/onnx_check.py)
    passes      each pass's registered ONNX rewrite (passes/onnx_rewrites.py) on the steps it targets
    write       prefill.onnx (the prompt), decode.onnx (each new token), the manifest and
                genai_config.json: the directory ``tokenpass.export_onnx`` writes, so ``OnnxModel``,
                ``tokenpass bench --backend onnx``, ``tokenpass inspect`` and onnxruntime-genai run it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass

from tokenpass.api import user_passes
from tokenpass.errors import CaptureError, PassError
from tokenpass.ir.capture import PHASES
from tokenpass.ir.foreign.canonicalize import canonicalize
from tokenpass.ir.foreign.contrib import lower_group_query_attention, lower_simplified_layer_norm
from tokenpass.ir.foreign.interface import normalize_interface
from tokenpass.ir.foreign.load import default_opset, load_model
from tokenpass.ir.foreign.sites import OnnxAttentionSite, find_attention_sites
from tokenpass.onnx_export import OnnxExport, check_target, full_check, write_export_directory
from tokenpass.passes import Pass
from tokenpass.passes.onnx_rewrites import OnnxContext, onnx_rewrite
from tokenpass.progress import status
from tokenpass.runtime.genai_config import write_genai_config
from tokenpass.runtime.onnx_check import check_same_outputs, one_query_mask_misses, session_of
from tokenpass.runtime.onnx_session import OnnxManifest, phase_file

CANONICALIZE = "canonicalize_attention"
Changes = dict[str, dict[str, dict[str, int]]]


def optimize_onnx(source: str | Path, path: str | Path, passes: "Sequence[str | Pass | type[Pass]]" = (),
                  force: bool = False, check: bool = True,
                  token_ids: dict[str, int | list[int]] | None = None) -> OnnxExport:
    """Write ``source`` (an ONNX decoder with an explicit KV cache) after ``passes`` to the directory
    ``path``, as ``export_onnx`` writes a torch model. ``token_ids``: ``bos``/``eos``/``pad`` ids for
    onnxruntime-genai's config (an ONNX file does not carry them)."""
    source, target = Path(source), Path(path)
    check_target(target, force)
    requested = user_passes(passes)
    for p in requested:
        onnx_rewrite(p)  # a pass with no ONNX rewrite is refused before any work
    with status(f"reading {source.name}"):
        model = load_model(source)
    opset = default_opset(model)
    lowered = lower_group_query_attention(model, opset, source.stem)
    lower_simplified_layer_norm(model)
    sites = _sites(model, source)
    with status(f"canonicalising {len(sites)} attention sites"):
        spellings = _spellings(sites)
        sites = canonicalize(model, sites, opset)
        spec, interface = normalize_interface(model, sites, source.stem)
        reference = session_of(source)
        check_same_outputs(reference, session_of(model), spec, "canonicalising attention", interface.renamed,
                           padded=not lowered)  # the fused op's seqlens_k assumes right padding; ours, left
    for p in requested:
        p.check_model(spec)
    context = OnnxContext(spec, opset, one_query_mask_misses(model, sites, spec))
    steps = {PHASES[0]: _copy(model), PHASES[1]: model}
    changes: Changes = {phase: {CANONICALIZE: spellings} for phase in PHASES}
    for phase, step in steps.items():
        _apply(step, requested, phase, context, changes[phase], source.name)
    names = [CANONICALIZE] + [p.name for p in requested if any(p.name in c for c in changes.values())]

    def write(staging: Path) -> int:
        for phase, step in steps.items():
            ir.save(step, staging / phase_file(phase))
            if check:
                full_check(staging / phase_file(phase))
        OnnxManifest.of(spec, names, opset, changes).write(staging)
        write_genai_config(staging, spec, token_ids or {})
        return opset

    with status(f"writing {target}"):
        write_export_directory(target, write)
    return OnnxExport(target, {p: target / phase_file(p) for p in PHASES}, names, opset)


def _sites(model: ir.Model, source: Path) -> list[OnnxAttentionSite]:
    sites, misses = find_attention_sites(model.graph)
    if not sites:
        why = f"; the closest candidate: {misses[0]}" if misses else ""
        raise CaptureError(f"{source}: no recognisable attention over an explicit KV cache (MatMul/Softmax/MatMul, "
                           f"opset-23 Attention, each reading cat(past input, new) keys and values){why}")
    return sites


def _spellings(sites: list[OnnxAttentionSite]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for site in sites:
        spelling = site.node.metadata_props.get("tokenpass.from", site.spelling)
        key = f"{spelling.replace('-', '_').replace('.', '_')}_sites"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _apply(step: ir.Model, requested: list[Pass], phase: str, context: OnnxContext, changes: dict, name: str) -> None:
    """Each pass that targets ``phase``, on the step's canonical sites; a pass that cannot rewrite it is
    refused with its reason (the file is not written)."""
    for p in requested:
        if phase not in p.phases:
            continue
        sites = [s for s in find_attention_sites(step.graph)[0] if s.spelling == "tokenpass"]
        result = onnx_rewrite(p)(p, step, sites, context)
        if result.misses:
            raise PassError(f"{p.name} cannot rewrite {name}'s {phase} step: {result.misses[0]}")
        RemoveUnusedNodesPass()(step)  # what the rewritten calls used to read, and functions no longer called
        RemoveUnusedFunctionsPass()(step)
        if result.modified:
            changes[p.name] = dict(result.counts)
