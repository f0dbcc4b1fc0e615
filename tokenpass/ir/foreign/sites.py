"""Attention sites in a foreign ONNX decoder, found by what the nodes compute, not by names.

Two spellings are recognised, each only over an explicit KV cache (keys and values ``cat(past, new)`` on
the sequence axis, the past a graph input), which is what generation with a cache needs:

``MatMul -> Softmax -> MatMul`` (torch's exporter's SDPA below opset 23, HF eager attention)::

    scores = MatMul(q * a, Transpose(repeat(cat(past_k, k))) * b) [* c]      # scale = a * b * c
    probs  = Softmax(scores + mask)  [-> Where(IsNaN(probs), 0, probs)]
    out    = MatMul(probs, repeat(cat(past_v, v)))

opset-23 ``Attention(q, repeat(cat(past_k, k)), repeat(cat(past_v, v)), mask)`` with its own scale and
soft cap (not its ``past_key``/``past_value`` inputs). onnxruntime's ``com.microsoft`` GroupQueryAttention
(onnxruntime-genai's builder) is lowered to the canonical form before sites are read (``contrib.py``); what
it cannot lower, and the other com.microsoft attention ops, are refused by name, saying why.

``repeat`` is GQA's head repetition (Unsqueeze/Expand/Reshape) and any other pure layout op; the site
records the un-repeated cache tensors, as tokenpass's canonical attention takes them. What a site means
is then checked by running it (``verify.py``), so a spelling that looks right and is not is refused.
A candidate that does not fit says why, naming its node (``Miss``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_ir as ir

from tokenpass.ir.onnx_slots import static_dim

LAYOUT_OPS = {"Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Identity"}
SCALE_OPS = {"Mul", "Div"}
CONTRIB_ATTENTION = ("GroupQueryAttention", "MultiHeadAttention", "Attention")


@dataclass
class OnnxAttentionSite:
    """One attention computation: its query, cached keys/values, mask and constants, and the value its
    result lands in (``output``, replaced when the site is rewritten)."""

    layer: int
    node: ir.Node  # the node whose output is the attention result
    query: ir.Value
    key: ir.Value  # cat(past_key, new_key): [B, Hkv, S, D]
    value: ir.Value
    mask: ir.Value | None
    scale: float
    softcap: float | None
    spelling: str  # "matmul-softmax" | "onnx-attention" | "tokenpass"

    @property
    def output(self) -> ir.Value:
        return self.node.outputs[0]

    @property
    def past_key(self) -> ir.Value:
        return self.key.producer().inputs[0]

    @property
    def past_value(self) -> ir.Value:
        return self.value.producer().inputs[0]

    @property
    def window(self) -> int:
        """0: a site a method rewrites has a mask checked to be causal + padding (``runtime/onnx_check.py``)."""
        return 0


@dataclass(frozen=True)
class Miss:
    node: str
    reason: str

    def __str__(self) -> str:
        return f"node '{self.node}': {self.reason}"


class NotASite(Exception):
    """A candidate node that is not (supported) attention, with the reason."""


def find_attention_sites(graph: ir.Graph) -> tuple[list[OnnxAttentionSite], list[Miss]]:
    """Every attention site in graph order (layer = order), and the candidates that did not fit."""
    sites, misses = [], []
    for node in graph:
        reader = _READERS.get((node.domain, node.op_type))
        if reader is None:
            continue
        try:
            sites.append(reader(node, len(sites)))
        except NotASite as exc:
            misses.append(Miss(node.name or node.op_type, str(exc)))
    return sites, misses


def _softmax_site(softmax: ir.Node, layer: int) -> OnnxAttentionSite:
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        raise NotASite("Softmax is not over the last axis")
    scores, mask = _split_mask(softmax.inputs[0])
    scores, scale = _strip_scalars(scores)
    matmul = scores.producer() if scores is not None else None
    if matmul is None or matmul.op_type != "MatMul":
        raise NotASite("Softmax's input is not a scaled, masked MatMul of queries and keys")
    query, q_scale = _strip_scalars(matmul.inputs[0])
    key, k_scale = _cache_root(matmul.inputs[1], "keys")
    product = _values_product(softmax)
    value, _ = _cache_root(product.inputs[1], "values")
    return OnnxAttentionSite(layer, product, query, key, value, mask, scale * q_scale * k_scale, None,
                             "matmul-softmax")


def _attention_site(node: ir.Node, layer: int) -> OnnxAttentionSite:
    if len(node.inputs) > 4 and any(v is not None for v in node.inputs[4:]):
        raise NotASite("Attention keeps its own past_key/past_value; only an explicit cat(past, new) is supported")
    if _rank(node.inputs[0]) != 4:
        raise NotASite("Attention's query is not 4-D [batch, heads, tokens, head_dim]")
    if node.attributes.get_int("is_causal", 0):
        raise NotASite("Attention with is_causal=1 (the mask must come as an input)")
    if sum(len(out.uses()) for out in node.outputs[1:]):
        raise NotASite("Attention's extra outputs (present keys, scores) are used")
    key, _ = _cache_root(node.inputs[1], "keys")
    value, _ = _cache_root(node.inputs[2], "values")
    head_dim = static_dim(node.inputs[0], 3)
    scale = node.attributes.get_float("scale", None)
    if scale is None:
        if head_dim is None:
            raise NotASite("Attention has no scale attribute and its head size is not static")
        scale = 1 / math.sqrt(head_dim)
    softcap = node.attributes.get_float("softcap", 0.0) or None
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    return OnnxAttentionSite(layer, node, node.inputs[0], key, value, mask, scale, softcap, "onnx-attention")


def _contrib_site(node: ir.Node, layer: int) -> OnnxAttentionSite:
    """onnxruntime's fused attention ops left in the graph: ``ir/foreign/contrib.py`` lowers every
    GroupQueryAttention it can first, so one found here is one it cannot, and this says why."""
    raise NotASite(gqa_refusal(node) if node.op_type == "GroupQueryAttention" else
                   f"com.microsoft {node.op_type} is not rewritten (onnxruntime-genai's decoders use "
                   "GroupQueryAttention, which is)")


def gqa_refusal(node: ir.Node) -> str | None:
    """Why a com.microsoft GroupQueryAttention cannot be lowered to standard attention, or None."""
    attrs = node.attributes
    unsupported = [(attrs.get_int("local_window_size", -1) != -1, "a local (sliding) window"),
                   (attrs.get_int("rotary_interleaved", 0) != 0, "interleaved rotary embedding"),
                   (attrs.get_int("smooth_softmax", 0) != 0, "smooth softmax"),
                   (any(v is not None for v in node.inputs[9:]), "position_ids, attention_bias or head_sink inputs"),
                   (len(node.inputs) < 5 or node.inputs[3] is None or not node.inputs[3].is_graph_input(),
                    "no past_key graph input (no explicit KV cache)")]
    for bad, what in unsupported:
        if bad:
            return f"com.microsoft GroupQueryAttention with {what} is not supported"
    if attrs.get_int("do_rotary", 0) and (len(node.inputs) < 9 or node.inputs[7] is None):
        return "com.microsoft GroupQueryAttention with do_rotary=1 has no cos_cache/sin_cache"
    return None


def canonical_site(node: ir.Node, layer: int) -> OnnxAttentionSite:
    """A ``tokenpass.Attention`` node (a canonicalised site), its constants read from its metadata."""
    meta = node.metadata_props
    key, value = node.inputs[1], node.inputs[2]
    softcap = meta.get("tokenpass.softcap")
    return OnnxAttentionSite(layer, node, node.inputs[0], key, value, node.inputs[3] if len(node.inputs) > 3 else None,
                             float(meta.get("tokenpass.scale", "1")), float(softcap) if softcap else None, "tokenpass")


def _split_mask(value: ir.Value) -> tuple[ir.Value | None, ir.Value | None]:
    """``scores + mask`` as (scores, mask); the operand that is a MatMul (after scalars) is the scores."""
    node = value.producer()
    if node is None or node.op_type != "Add":
        return value, None
    for scores, mask in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        root, _ = _strip_scalars(scores)
        if root is not None and root.producer() is not None and root.producer().op_type == "MatMul":
            return scores, mask
    raise NotASite("the Add before Softmax has no MatMul operand")


def _strip_scalars(value: ir.Value | None) -> tuple[ir.Value | None, float]:
    """``value`` with multiplications/divisions by scalar constants peeled off, and their product."""
    factor = 1.0
    while value is not None and (node := value.producer()) is not None and node.op_type in SCALE_OPS:
        constant = _scalar(node.inputs[1])
        if constant is None and node.op_type == "Mul":
            constant, other = _scalar(node.inputs[0]), node.inputs[1]
        else:
            other = node.inputs[0]
        if constant is None:
            break
        factor *= constant if node.op_type == "Mul" else 1 / constant
        value = other
    return value, factor


def _cache_root(value: ir.Value, what: str) -> tuple[ir.Value, float]:
    """The cache tensor behind ``value`` through layout ops and scalar factors: a Concat of a graph input
    (the past) and the new entries on the sequence axis."""
    factor = 1.0
    while True:
        value, scalar = _strip_scalars(value)
        factor *= scalar
        node = value.producer()
        if node is None or node.op_type not in LAYOUT_OPS:
            break
        value = node.inputs[0]
    node = value.producer()
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2 or not node.inputs[0].is_graph_input():
        raise NotASite(f"the {what} are not cat(past input, new) (no explicit KV cache on them, or a cache that "
                       "drops tokens, e.g. a sliding window's)")
    if node.attributes.get_int("axis", 0) not in (2, -2) or _rank(value) not in (4, None):
        raise NotASite(f"the {what}' cache Concat is not on the sequence axis of [batch, heads, seq, head_dim]")
    return value, factor


def _values_product(softmax: ir.Node) -> ir.Node:
    """The MatMul of the probabilities with the values, through ops that only fix empty rows (Where, Cast)."""
    frontier = [softmax.outputs[0]]
    for _ in range(3):
        following = []
        for value in frontier:
            for user, index in value.uses():
                if user.op_type == "MatMul" and index == 0:
                    return user
                if user.op_type in ("Where", "Cast"):
                    following.append(user.outputs[0])
        frontier = following
    raise NotASite("Softmax's probabilities do not reach a MatMul with values")


def _scalar(value: ir.Value | None) -> float | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(()))


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


_READERS = {("", "Softmax"): _softmax_site, ("", "Attention"): _attention_site,
            ("tokenpass", "Attention"): canonical_site,
            **{("com.microsoft", op): _contrib_site for op in CONTRIB_ATTENTION}}
