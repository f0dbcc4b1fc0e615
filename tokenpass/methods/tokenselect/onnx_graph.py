"""TokenSelect on a foreign ONNX decoder's decode step: every canonical ``tokenpass.Attention`` call
becomes a ``tokenpass.TokenSelectAttention`` call whose body is the explicit-cache translation
(``onnx_translation.py``): the first ``n_init`` and last ``n_local`` live slots plus the ``top_k``
soft-voted ones, attended with their original positions.

Before / after (canonicalised decode step, every layer)::

    out_l = tokenpass.Attention(q_l, cat(past_k_l, k_l), cat(past_v_l, v_l), mask)
    out_l = tokenpass.TokenSelectAttention(q_l, cat(past_k_l, k_l), cat(past_v_l, v_l), mask)

Refused, as on the explicit form of torch graphs: ``theta`` (the selection cache lives in the runtime's
KV cache) and masks that are not causal + padding (positions are counted over live slots).
"""

from __future__ import annotations

import onnx_ir as ir

from tokenpass.ir.foreign.canonicalize import replace_site
from tokenpass.ir.foreign.sites import OnnxAttentionSite
from tokenpass.ir.foreign.trace import has_calls
from tokenpass.methods.tokenselect.onnx_translation import explicit_token_select_onnx
from tokenpass.methods.tokenselect.rewrite import TokenSelect
from tokenpass.passes.onnx_rewrites import OnnxContext, OnnxRewriteResult, register_onnx_rewrite

FUNCTION = "TokenSelectAttention"  # as export names the explicit op


def rewrite_onnx(p: TokenSelect, model: ir.Model, sites: list[OnnxAttentionSite],
                 context: OnnxContext) -> OnnxRewriteResult:
    result = OnnxRewriteResult(p.name)
    if has_calls(model, (FUNCTION,)):
        result.counts["already_applied"] = 1
        return result
    result.misses = list(context.mask_misses)
    if p.theta is not None:
        result.misses.append(f"theta={p.theta} reuses selections kept in the runtime's KV cache between steps, "
                             "which an ONNX file does not have; pass theta=None")
    if result.misses:
        return result
    options = {"n_init": p.n_init, "n_local": p.n_local, "top_k": p.top_k}
    for site in sites:
        replace_site(model, site, explicit_token_select_onnx, FUNCTION, context.opset, options=options,
                     metadata={"tokenpass.pass": p.name})
        result.counts["selecting_layers"] += 1
    return result


register_onnx_rewrite(TokenSelect.name, rewrite_onnx)
