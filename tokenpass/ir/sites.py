"""Find the semantic sites of a captured decoder: layers, attention, cache reads/updates, norm, LM head, loss.

Sites are found from what the graph computes (an attention op, a concatenation of a cache input with
new keys along the sequence axis, the linear that produces the logits output), with module paths from
``torch.export``'s ``nn_module_stack`` metadata used only to name them. No model family is special-cased.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import fx

import tokenpass.ir.ops  # noqa: F401 - registers the core attention ops and their roles
from tokenpass.ir.op_registry import lookup_attention
from tokenpass.ir.ops import RUNTIME_CACHE, SDPA  # noqa: F401 - SDPA re-exported for passes

aten = torch.ops.aten
LOSS_TARGETS = {
    aten.cross_entropy_loss.default,
    aten.nll_loss_forward.default,
    aten.nll_loss_nd.default,
    aten.nll_loss.default,
}
# Ops between the final norm and the LM head (or the head and the logits output) that only reshape or
# pick rows (``index_select`` is what select_logit_rows inserts).
_LAYOUT_OPS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.slice.Tensor,
    aten.index_select.default,
}
# Elementwise ops that, given one tensor and otherwise scalars (``logits / c``, ``tanh``, ``to(dtype)``),
# compute each output element from the same element of that tensor alone: applied to the logits (e.g.
# final logit soft-capping, ``tanh(logits / c) * c``) they commute with picking rows.
_ROWWISE_OPS = {
    aten.div.Tensor,
    aten.div.Scalar,
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.add.Tensor,
    aten.add.Scalar,
    aten.sub.Tensor,
    aten.sub.Scalar,
    aten.tanh.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
}
_WRAPPER_PREFIX = "model."  # CausalLMStep holds the user's model as ``self.model``
_INT_SEGMENT = re.compile(r"^\d+$")


@dataclass(frozen=True)
class CacheSlot:
    """One of a layer's two caches (keys or values) as the graph reads and updates it."""

    past: str | None  # graph input holding the cached positions
    new: str | None  # the newly computed keys/values (keys after position encoding)
    present: str | None  # the updated cache the graph returns (past ++ new)


@dataclass(frozen=True)
class AttentionSite:
    node: str
    op: str
    layer: int
    module: str
    query: str
    key: str  # keys with their H_kv heads (any GQA head repetition stripped)
    value: str
    mask: str | None
    scale: float
    is_causal: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    key_cache: CacheSlot
    value_cache: CacheSlot
    softcap: float | None = None  # scores pass through softcap * tanh(s / softcap)
    window: int | None = None  # sliding window: keys fewer than this many positions behind the query
    extra_inputs: dict[str, str] = field(default_factory=dict)  # method-specific role -> input node name

    @property
    def label(self) -> str:
        """How errors and pass reports name this site."""
        return f"layer {self.layer} attention ({self.node})"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LayerSite:
    index: int
    module: str
    module_type: str
    attention: str | None


@dataclass(frozen=True)
class HeadSite:
    """The LM head and the norm feeding it."""

    node: str
    weight: str | None
    norm_module: str | None
    norm_kind: str | None
    # Row-wise elementwise ops from the head to the logits output (e.g. soft-capping), in dataflow order.
    post_ops: tuple[str, ...] = ()


@dataclass
class GraphSites:
    layers: list[LayerSite] = field(default_factory=list)
    attention: list[AttentionSite] = field(default_factory=list)
    lm_head: HeadSite | None = None
    loss: list[str] = field(default_factory=list)

    def attention_by_layer(self) -> dict[int, AttentionSite]:
        return {site.layer: site for site in self.attention}

    def to_dict(self) -> dict:
        return {
            "layers": [asdict(layer) for layer in self.layers],
            "attention": [site.to_dict() for site in self.attention],
            "lm_head": asdict(self.lm_head) if self.lm_head else None,
            "loss": list(self.loss),
        }


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """``(path, type name)`` pairs from outermost to innermost, paths relative to the user's model."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, ty in stack.values():
        path = path[len(_WRAPPER_PREFIX) :] if path.startswith(_WRAPPER_PREFIX) else path
        name = ty if isinstance(ty, str) else getattr(ty, "__qualname__", str(ty))
        out.append((path, name.rsplit(".", 1)[-1]))
    return out


def innermost_module(node: fx.Node) -> str:
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def enclosing_layer(node: fx.Node) -> tuple[int, str, str] | None:
    """The decoder layer around ``node``: the innermost module whose path ends in a list index."""
    for path, type_name in reversed(module_stack(node)):
        last = path.rsplit(".", 1)[-1]
        if _INT_SEGMENT.match(last):
            return int(last), path, type_name
    return None


def tensor_meta(node: fx.Node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def strip_head_repeat(node: fx.Node) -> fx.Node:
    """Undo HF's ``repeat_kv`` (unsqueeze(2) -> expand -> reshape), returning the ``[B,H_kv,S,D]`` source.

    Only an exact interleaving repeat is stripped (query head h reading KV head h // group); any other
    chain is returned as it is, which stays correct and merely forgoes the GQA saving.
    """
    chain, cur = [], node
    while isinstance(cur, fx.Node) and cur.op == "call_function" and cur.target in _REPEAT_OPS:
        chain.append(cur)
        cur = cur.args[0]
    unsqueezes = [n for n in chain if n.target == aten.unsqueeze.default]
    if len(unsqueezes) != 1 or not any(n.target == aten.expand.default for n in chain):
        return node
    dim = unsqueezes[0].args[1]
    if dim not in (2, -3):
        return node
    src, out = tensor_meta(cur), tensor_meta(node)
    if src is None or out is None or src.dim() != 4 or out.dim() != 4:
        return node
    if str(src.shape[0]) != str(out.shape[0]) or str(src.shape[2]) != str(out.shape[2]):
        return node
    if int(out.shape[1]) % int(src.shape[1]) != 0 or src.shape[3] != out.shape[3]:
        return node
    if not all(is_full_slice(n) for n in chain if n.target == aten.slice.Tensor):
        return node
    return cur


_REPEAT_OPS = {aten.unsqueeze.default, aten.expand.default, aten.reshape.default, aten.view.default, aten.slice.Tensor}


def is_full_slice(node: fx.Node) -> bool:
    args = list(node.args) + [None] * 4
    start, end, step = args[2] or 0, args[3], args[4] or 1
    return start == 0 and step == 1 and (end is None or (isinstance(end, int) and end >= 2**62))


def match_cache_update(node: fx.Node, outputs: set[fx.Node]) -> CacheSlot:
    """``cat([past_input, new], dim=seq)`` that the graph returns is a cache update; otherwise no cache."""
    if node.op == "call_function" and node.target == aten.cat.default:
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if len(parts) == 2 and dim in (-2, 2) and parts[0].op == "placeholder":
            return CacheSlot(past=parts[0].name, new=parts[1].name, present=node.name if node in outputs else None)
    return CacheSlot(past=None, new=node.name, present=None)


def output_nodes(graph: fx.Graph) -> list[fx.Node]:
    (out,) = [n for n in graph.nodes if n.op == "output"]
    return list(torch.utils._pytree.tree_leaves(out.args[0]))


def _attention_args(node: fx.Node) -> dict:
    """The node's arguments by role (from the op registry); the scale defaults to 1/sqrt(head_dim)."""
    args = lookup_attention(node).args(node)
    query = args["query"]
    if args.get("scale") is None and tensor_meta(query) is not None:
        args["scale"] = float(tensor_meta(query).shape[-1]) ** -0.5
    return args


def attention_site(node: fx.Node, order: int, outputs: set[fx.Node]) -> AttentionSite:
    """Describe one attention node: its inputs, heads, cache slots and layer."""
    spec = lookup_attention(node)
    a = _attention_args(node)
    key, value = strip_head_repeat(a["key"]), strip_head_repeat(a["value"])
    layer_info = enclosing_layer(node)
    layer = a.get("layer") if a.get("layer") is not None else (layer_info[0] if layer_info else order)
    q, k = tensor_meta(a["query"]), tensor_meta(key)
    extras = {role: a[role].name for role in spec.extra_roles() if isinstance(a.get(role), fx.Node)}
    mask = a.get("mask")
    return AttentionSite(
        node=node.name,
        op=spec.name,
        layer=int(layer),
        module=innermost_module(node),
        query=a["query"].name,
        key=key.name,
        value=value.name,
        mask=mask.name if isinstance(mask, fx.Node) else None,
        scale=float(a["scale"]) if a.get("scale") is not None else float("nan"),
        is_causal=bool(a.get("is_causal", spec.reads_runtime_cache)),
        num_heads=int(q.shape[1]) if q is not None else -1,
        num_kv_heads=int(k.shape[1]) if k is not None else -1,
        head_dim=int(q.shape[-1]) if q is not None else -1,
        key_cache=_cache_slot(spec.reads_runtime_cache, key, outputs),
        value_cache=_cache_slot(spec.reads_runtime_cache, value, outputs),
        softcap=float(a["softcap"]) if a.get("softcap") is not None else None,
        window=int(a["window"]) if a.get("window") else None,
        extra_inputs=extras,
    )


def _cache_slot(reads_runtime_cache: bool, kv: fx.Node, outputs: set[fx.Node]) -> CacheSlot:
    if reads_runtime_cache:
        return CacheSlot(past=RUNTIME_CACHE, new=kv.name, present=RUNTIME_CACHE)
    return match_cache_update(kv, outputs)


def find_lm_head(graph: fx.Graph) -> HeadSite | None:
    """The linear producing the first output (logits), and the norm before it.

    The linear is seen through layout ops and row-wise elementwise ops (``tanh(head(h) / c) * c`` caps the
    logits of Gemma 2 and others); those ops are listed in ``post_ops`` so passes know what follows the head.
    """
    outputs = output_nodes(graph)
    if not outputs:
        return None
    node, post_ops = _through_rowwise(outputs[0])
    if node.op != "call_function" or node.target not in (aten.linear.default, aten.mm.default, aten.matmul.default):
        return None
    weight = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], fx.Node) else None
    norm = _through_layout(node.args[0])
    norm_module = innermost_module(norm) or None
    return HeadSite(
        node=node.name,
        weight=weight.name if weight is not None else None,
        norm_module=norm_module,
        norm_kind=_norm_kind(graph, norm_module) if norm_module else None,
        post_ops=tuple(op.name for op in post_ops),
    )


def _through_layout(node: fx.Node) -> fx.Node:
    """The tensor ``node`` reshapes or picks rows of (itself if it is no layout op)."""
    while node.op == "call_function" and node.target in _LAYOUT_OPS:
        node = node.args[0]
    return node


def _through_rowwise(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk back from ``node`` through layout ops and row-wise elementwise ops.

    Returns the producer reached and the elementwise ops crossed, producer side first. An elementwise op
    is crossed only when its input feeds nothing else: otherwise that input's rows are needed elsewhere
    too, and computing the head for some rows only would change another result.
    """
    crossed: list[fx.Node] = []
    node = _through_layout(node)
    while _is_rowwise(node):
        source = _through_layout(node.args[0])
        if not _only_feeds(source, node):
            break
        crossed.append(node)
        node = source
    return node, crossed[::-1]


def _only_feeds(source: fx.Node, sink: fx.Node) -> bool:
    """Whether ``source`` and the layout ops between it and ``sink`` each have a single live user.

    Users whose result nothing reads (``_assert_tensor_metadata`` checks on a cast's input) do not count:
    they return nothing that picking rows could change.
    """
    node = sink.args[0]
    while len(_live_users(node)) == 1:
        if node is source:
            return True
        node = node.args[0]
    return False


def _live_users(node: fx.Node) -> list[fx.Node]:
    return [user for user in node.users if user.op == "output" or user.users]


def _is_rowwise(node: fx.Node) -> bool:
    """An op of ``_ROWWISE_OPS`` whose only tensor operand is its first argument (the rest are scalars)."""
    if node.op != "call_function" or node.target not in _ROWWISE_OPS or not node.args:
        return False
    operands = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
    return operands == [node.args[0]]


def _norm_kind(graph: fx.Graph, module: str) -> str | None:
    targets = {n.target for n in graph.nodes if n.op == "call_function" and innermost_module(n) == module}
    if aten.layer_norm.default in targets or aten.native_layer_norm.default in targets:
        return "layer_norm"
    if aten.rms_norm.default in targets or {aten.rsqrt.default, aten.mean.dim} <= targets:
        return "rms_norm"
    return None


def find_sites(graph: fx.Graph) -> GraphSites:
    """All semantic sites of ``graph``, attention sites in layer order."""
    outputs = set(output_nodes(graph))
    attention_nodes = [n for n in graph.nodes if lookup_attention(n) is not None]
    sites = GraphSites()
    sites.attention = sorted(
        (attention_site(n, i, outputs) for i, n in enumerate(attention_nodes)), key=lambda s: s.layer
    )
    by_node = {n.name: n for n in attention_nodes}
    layers: dict[int, LayerSite] = {}
    for site in sites.attention:
        info = enclosing_layer(by_node[site.node])
        module, type_name = (info[1], info[2]) if info else (site.module, "")
        layers[site.layer] = LayerSite(index=site.layer, module=module, module_type=type_name, attention=site.node)
    sites.layers = [layers[i] for i in sorted(layers)]
    sites.lm_head = find_lm_head(graph)
    sites.loss = [n.name for n in graph.nodes if n.op == "call_function" and n.target in LOSS_TARGETS]
    return sites


def op_histogram(graph: fx.Graph) -> Counter:
    return Counter(str(n.target) for n in graph.nodes if n.op == "call_function")
