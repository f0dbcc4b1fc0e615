"""Every attention site of a foreign ONNX decoder as one ``tokenpass.Attention`` function call.

Before (one of the spellings ``sites.py`` reads)::

    scores = MatMul(q * 0.35, Transpose(Reshape(Expand(cat(past_k, k)))) * 0.35) + mask
    out    = MatMul(Where(IsNaN(Softmax(scores)), 0, Softmax(scores)), Reshape(Expand(cat(past_v, v))))

After::

    out = tokenpass.Attention(q, cat(past_k, k), cat(past_v, v), mask)    # scale 0.125 in its metadata

The function's body is ``ir/onnx_translations.attention_onnx`` (standard ops: query heads grouped onto
their KV head, no repeated K/V), the same arithmetic tokenpass's own exports inline. Methods rewrite
these calls; nodes only the old spelling used are removed. Already-canonical calls stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from tokenpass.ir.foreign.sites import OnnxAttentionSite, canonical_site
from tokenpass.ir.foreign.trace import call_function, trace_function
from tokenpass.ir.onnx_translations import attention_onnx

ARGUMENTS = ("query", "key", "value", "mask")


def canonicalize(model: ir.Model, sites: list[OnnxAttentionSite], opset: int) -> list[OnnxAttentionSite]:
    """Replace each site by a ``tokenpass.Attention`` call; returns the canonical sites, layer by layer."""
    canonical = []
    for site in sites:
        canonical.append(site if site.spelling == "tokenpass" else _replace(model, site, opset))
    RemoveUnusedNodesPass()(model)
    return canonical


def _replace(model: ir.Model, site: OnnxAttentionSite, opset: int) -> OnnxAttentionSite:
    node = replace_site(model, site, attention_onnx, "Attention", opset)
    return canonical_site(node, site.layer)


def replace_site(model: ir.Model, site: OnnxAttentionSite, translation: Callable, name: str, opset: int,
                 extra: tuple = (), options: dict | None = None, metadata: dict | None = None) -> ir.Node:
    """A call of ``translation`` (traced as ``tokenpass.<name>``) on the site's query, keys, values, mask
    and ``extra`` arguments, in the site's place: its result takes over the site's uses. ``options``
    join the site's scale and soft cap (the layer is metadata, not arithmetic: equal layers share one
    function); ``metadata`` joins the site's."""
    node = insert_call(model, site, translation, name, opset, extra, options, metadata)
    out = node.outputs[0]
    out.type, out.shape = site.output.type, site.output.shape
    ir.convenience.replace_all_uses_with(site.output, out)
    return node


def insert_call(model: ir.Model, site: OnnxAttentionSite, translation: Callable, name: str, opset: int,
                extra: tuple = (), options: dict | None = None, metadata: dict | None = None) -> ir.Node:
    """``replace_site``'s call, inserted before the site's node, its result not yet used."""
    arguments = (site.query, site.key, site.value, site.mask, *extra)
    options = {**(options or {}), "scale": site.scale, "softcap": site.softcap}
    names = (*ARGUMENTS, *(f"extra_{i}" for i in range(len(extra))))
    function = trace_function(translation, name, arguments, names, options, opset)
    node = call_function(model, function, arguments, site.node, {**site_metadata(site), **(metadata or {})})
    node.name = f"tokenpass_{name.lower()}_{site.layer}"
    node.outputs[0].name = f"{name.lower()}_{site.layer}"
    return node


def site_metadata(site: OnnxAttentionSite) -> dict[str, str]:
    """The constants a later rewrite needs, as node metadata (``sites.canonical_site`` reads them back)."""
    spelling = site.node.metadata_props.get("tokenpass.from") if site.spelling == "tokenpass" else site.spelling
    meta = {"tokenpass.layer": str(site.layer), "tokenpass.scale": repr(site.scale), "tokenpass.from": spelling}
    if site.softcap is not None:
        meta["tokenpass.softcap"] = repr(site.softcap)
    return meta
