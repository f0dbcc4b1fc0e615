"""TidalDecode on a foreign ONNX decoder's decode step: canonical ``tokenpass.Attention`` calls become
``tokenpass.SelectionAttention`` / ``tokenpass.SparseAttention`` calls, layer by layer as the torch rewrite
places them, with the explicit-cache translations (``onnx_translation.py``) as their bodies.

Before (canonicalised decode step)::

    out_2 = tokenpass.Attention(q_2, cat(past_k_2, k_2), cat(past_v_2, v_2), mask)
    out_3 = tokenpass.Attention(q_3, cat(past_k_3, k_3), cat(past_v_3, v_3), mask)

After (sparse_start=2)::

    out_2, slots_2 = tokenpass.SelectionAttention(q_2, cat(past_k_2, k_2), cat(past_v_2, v_2), mask)
    out_3 = tokenpass.SparseAttention(q_3, cat(past_k_3, k_3), cat(past_v_3, v_3), mask, slots_2)

Slot liveness is read off the mask, so a model whose masks are not causal + padding is refused (all or
nothing, as the torch rewrite); so are the runtime-only options (``correction_interval``, ``score_dtype``).
"""

from __future__ import annotations

import onnx_ir as ir

from tokenpass.ir.foreign.canonicalize import replace_site
from tokenpass.ir.foreign.sites import OnnxAttentionSite
from tokenpass.ir.foreign.trace import has_calls
from tokenpass.methods.tidaldecode.onnx_translation import explicit_selection_onnx, explicit_sparse_onnx
from tokenpass.methods.tidaldecode.rewrite import TidalDecode
from tokenpass.passes.onnx_rewrites import OnnxContext, OnnxRewriteResult, register_onnx_rewrite

SELECTION, SPARSE = "SelectionAttention", "SparseAttention"  # as export names the explicit ops
METADATA = {"tokenpass.pass": TidalDecode.name}


def rewrite_onnx(p: TidalDecode, model: ir.Model, sites: list[OnnxAttentionSite],
                 context: OnnxContext) -> OnnxRewriteResult:
    result = OnnxRewriteResult(p.name)
    if has_calls(model, (SELECTION, SPARSE)):
        result.counts["already_applied"] = 1
        return result
    selection = p.placed_selection_layers(sites)
    result.misses = [*context.mask_misses, *_option_misses(p)]
    if p.sparse_start not in selection:  # as the torch rewrite refuses it
        result.misses.append(f"layer sparse_start={p.sparse_start} must be a selection layer (got "
                             f"{sorted(selection)}): the first sparse layer needs a selection to read")
    if result.misses:
        return result
    slots = None
    for site in sites:
        if site.layer < p.sparse_start or slots is None and site.layer not in selection:
            result.counts["dense_layers"] += 1
        elif site.layer in selection:
            slots = _selection(p, model, site, context)
            result.counts["selection_layers"] += 1
        else:
            replace_site(model, site, explicit_sparse_onnx, SPARSE, context.opset, extra=(slots,), metadata=METADATA)
            result.counts["sparse_layers"] += 1
    return result


def _option_misses(p: TidalDecode) -> list[str]:
    misses = []
    if p.correction_interval:
        misses.append("correction_interval re-encodes tokens in the runtime's KV cache, which an ONNX file does "
                      "not have; leave it unset")
    if p.score_dtype is not None and p.sparse_selection_output:
        misses.append("score_dtype keeps a ranking copy of the keys in the runtime's cache; leave it unset for ONNX")
    return misses


def _selection(p: TidalDecode, model: ir.Model, site: OnnxAttentionSite, context: OnnxContext) -> ir.Value:
    _, channels = p.ranking_options(context.spec.head_dim)  # the spec's head size is static, a site's may not be
    options = {"top_k": p.top_k, "per_kv_head": p.per_kv_head, "sparse_output": p.sparse_selection_output,
               "score_channels": channels}
    node = replace_site(model, site, explicit_selection_onnx, SELECTION, context.opset, options=options,
                        metadata=METADATA)
    node.outputs[1].name = f"slots_{site.layer}"
    node.outputs[1].type = ir.TensorType(ir.DataType.INT64)
    return node.outputs[1]


register_onnx_rewrite(TidalDecode.name, rewrite_onnx)
