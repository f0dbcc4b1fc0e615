"""Recognise attention spelled out as matmul / scale / soft-cap / mask / softmax / matmul in an fx graph.

HF's ``eager_attention_forward`` (any model loaded with ``attn_implementation="eager"``, and Gemma 2,
which needs eager attention for its logit soft-cap) exports as::

    k_t = aten.transpose(k_rep, 2, 3)                  # k_rep: keys after repeat_kv, [B,H,S,D]
    w = aten.matmul(q, k_t)                            # [B,H,T,S]
    w = aten.mul(w, 0.0625)                            # scale (div by a constant also counts)
    w = aten.mul(aten.tanh(aten.div(w, 50.0)), 50.0)   # soft-cap, Gemma 2 only
    w = aten.add(w, mask)                              # additive float mask, [B,1,T,S]
    p = aten.softmax(w, -1, torch.float32)
    p = aten.dropout(aten.to(p, torch.float32), 0.0, False)
    out = aten.matmul(p, v_rep)                        # [B,H,T,D]

``match_eager_attention`` names ``out`` and the pieces ``tokenpass.attention`` needs:
``q``, ``k``/``v`` with their ``H_kv`` heads (``repeat_kv`` stripped), ``mask``, ``scale=0.0625``,
``softcap=50.0``. Nothing is keyed on a model family: every softmax next to a matmul is a candidate,
and a candidate becomes a match only if each step is one the canonical op computes (scale, soft-cap
and mask in that order, softmax over the last axis, shapes ``[B,H,T,D] x [B,Hkv,S,D]``); otherwise it
is a ``Miss`` naming the first check that failed.

Spellings seen besides the above, all matched: GPT-2's softmax without a dtype, Falcon's in-place
``div_`` by ``sqrt(head_dim)`` on multi-query keys (one KV head, broadcast by the matmul, no repeat).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from tokenpass.ir.sites import enclosing_layer, strip_head_repeat, tensor_meta
from tokenpass.passes.base import Miss

aten = torch.ops.aten

MATMUL = aten.matmul.default
SOFTMAXES = (aten.softmax.int, aten._softmax.default)
_SCALE_MULS = (aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.mul_.Scalar)
_SCALE_DIVS = (aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, aten.div_.Scalar)
_ADDS = (aten.add.Tensor, aten.add_.Tensor)
_ASSERT = aten._assert_tensor_metadata.default


class NotAttention(Exception):
    """One check of the pattern failed: ``check`` names it, the message says what the graph had."""

    def __init__(self, check: str, reason: str):
        super().__init__(reason)
        self.check = check


@dataclass(frozen=True)
class EagerAttention:
    """One matched eager attention: ``output`` computes ``tokenpass.attention(query, key, ...)``."""

    output: fx.Node  # matmul(probs, v_rep): the node the canonical op replaces
    scores: fx.Node  # matmul(q, k_rep^T)
    chain: tuple[fx.Node, ...]  # every node from ``scores`` (exclusive) to ``output`` (exclusive), in order
    softmax: fx.Node
    query: fx.Node  # [B,H,T,D]
    key: fx.Node  # [B,Hkv,S,D], head repetition stripped
    value: fx.Node  # [B,Hkv,S,Dv], head repetition stripped
    mask: fx.Node | None  # additive float mask broadcastable to [B,H,T,S]
    scale: float
    softcap: float | None
    identities: tuple[fx.Node, ...]  # no-ops on the way (same-dtype casts, p=0 dropout, clones)


def match_eager_attention(graph: fx.Graph) -> tuple[list[EagerAttention], list[Miss]]:
    """Every eager attention in ``graph``, and a ``Miss`` for each softmax next to a matmul that is not one."""
    matches, misses = [], []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in SOFTMAXES or _is_dead(node) or not _next_to_matmul(node):
            continue
        try:
            matches.append(match_at_softmax(node))
        except NotAttention as exc:
            misses.append(Miss(_label(node), exc.check, str(exc)))
    return matches, misses


def match_at_softmax(softmax: fx.Node) -> EagerAttention:
    """The eager attention around ``softmax``; raises ``NotAttention`` naming the first failed check."""
    _check_softmax(softmax)
    output, after = _probs_to_matmul(softmax)
    scores, mask, before = _unwrap_mask(softmax.args[0])
    scores, softcap = _unwrap_softcap(scores)
    scores, scale = _unwrap_scale(scores)
    scores, casts = _skip_identities(scores)
    if not _is_call(scores, MATMUL):
        raise NotAttention("scores from matmul(q, k^T)", f"the softmax input comes from {_describe(scores)}")
    query, key_rep = scores.args[0], _untranspose(scores.args[1])
    value_rep = output.args[1]
    key, value = strip_head_repeat(key_rep), strip_head_repeat(value_rep)
    _check_shapes(query, key_rep, key, value_rep, value, scores, mask, output)
    chain = _chain(scores, output, mask)
    _check_used_once((scores, *chain))
    return EagerAttention(
        output=output,
        scores=scores,
        chain=chain,
        softmax=softmax,
        query=query,
        key=key,
        value=value,
        mask=mask,
        scale=scale,
        softcap=softcap,
        identities=(*casts, *before, *after),
    )


def _chain(scores: fx.Node, output: fx.Node, mask: fx.Node | None) -> tuple[fx.Node, ...]:
    """The nodes data flows through from ``scores`` to ``output`` (the mask's own subgraph excluded)."""
    path, cur = [], output.args[0]
    while cur is not scores:
        path.append(cur)
        (cur,) = [n for n in cur.all_input_nodes if n is not mask]
    return tuple(reversed(path))


def _check_used_once(nodes: tuple[fx.Node, ...]) -> None:
    """Each intermediate feeds only the next step, so replacing the chain changes nothing else.

    This also makes in-place steps (Falcon divides its scores with ``div_``) safe to drop with the chain:
    nothing else reads the tensor they mutate.
    """
    for node in nodes:
        users = _users(node)
        if len(users) != 1:
            raise NotAttention("intermediates used once", f"{node.name} has {len(users)} users")


def _label(node: fx.Node) -> str:
    """How a miss names a candidate: like ``AttentionSite.label`` where the decoder layer is known."""
    layer = enclosing_layer(node)
    return f"layer {layer[0]} attention ({node.name})" if layer else f"attention ({node.name})"


def _is_call(node, targets) -> bool:
    targets = targets if isinstance(targets, tuple) else (targets,)
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _describe(node) -> str:
    if isinstance(node, fx.Node):
        return str(node.target) if node.op == "call_function" else node.name
    return repr(node)


def _users(node: fx.Node) -> list[fx.Node]:
    """Users that consume the value (dtype assertions only check it)."""
    return [u for u in node.users if not _is_call(u, _ASSERT)]


def _is_dead(node: fx.Node, depth: int = 6) -> bool:
    """Whether nothing uses ``node``'s value within a few steps (e.g. a chain already canonicalised, before dce)."""
    if node.op == "output" or depth == 0:
        return False
    return all(_is_dead(user, depth - 1) for user in _users(node))


def _next_to_matmul(softmax: fx.Node) -> bool:
    """Whether ``softmax`` is an attention candidate: a matmul feeds it or consumes it through cheap ops.

    Softmaxes elsewhere (a MoE router over a linear, sampling) are not candidates and are not reported.
    """
    cur = softmax.args[0]
    for _ in range(8):
        if _is_call(cur, MATMUL):
            return True
        if not isinstance(cur, fx.Node) or cur.op != "call_function" or not cur.args:
            break
        cur = cur.args[0]
    cur = softmax
    for _ in range(4):
        users = _users(cur)
        if len(users) != 1:
            return False
        cur = users[0]
        if _is_call(cur, MATMUL):
            return True
    return False


def _check_softmax(softmax: fx.Node) -> None:
    scores = tensor_meta(softmax.args[0])
    if scores is None or scores.dim() != 4:
        raise NotAttention("scores of rank 4", f"softmax input is {_shape(scores)}, not [B,H,T,S]")
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    if dim not in (-1, scores.dim() - 1):
        raise NotAttention("softmax over the last axis", f"softmax over dim {dim} of a rank-{scores.dim()} tensor")
    dtype = softmax.args[2] if len(softmax.args) > 2 else softmax.kwargs.get("dtype")
    if softmax.target == aten._softmax.default:  # (x, dim, half_to_float)
        dtype = torch.float32 if dtype else None
    if dtype not in (None, torch.float32, scores.dtype):
        raise NotAttention("softmax in float32 or the scores' dtype", f"softmax computes in {dtype}")


def _probs_to_matmul(softmax: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Follow the probabilities through no-ops to ``matmul(probs, v)``."""
    cur, seen = softmax, []
    while True:
        users = _users(cur)
        if len(users) != 1:
            raise NotAttention("probabilities used once", f"{cur.name} has {len(users)} users")
        user = users[0]
        if _is_call(user, MATMUL):
            if user.args[0] is not cur:
                raise NotAttention("matmul(probs, v)", f"{user.name} multiplies the probabilities from the right")
            return user, seen
        if not _is_identity(user, probs=True):
            raise NotAttention("probabilities reach matmul(probs, v)", f"they go through {_describe(user)}")
        seen.append(user)
        cur = user


def _unwrap_mask(node) -> tuple[fx.Node, fx.Node | None, list[fx.Node]]:
    """``add(scores, mask)`` (either order) -> ``(scores, mask)``; no add -> no mask."""
    node, casts = _skip_identities(node)
    if not _is_call(node, _ADDS):
        return node, None, casts
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
        raise NotAttention("mask added with alpha 1", f"{node.name} scales its second operand")
    a, b = node.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        raise NotAttention("mask is a tensor", f"{node.name} adds a constant to the scores")
    a_scores, b_scores = _reaches_matmul(a), _reaches_matmul(b)
    if a_scores == b_scores:
        raise NotAttention("one operand of the mask add is the scores", f"{node.name} adds {a.name} and {b.name}")
    scores, mask = (a, b) if a_scores else (b, a)
    return scores, mask, casts


def _reaches_matmul(node: fx.Node) -> bool:
    """Whether ``node`` is the scores: a matmul, seen through the scale / soft-cap ops and same-dtype casts."""
    for _ in range(8):
        if _is_call(node, MATMUL):
            return True
        if not _is_call(node, (*_SCALE_MULS, *_SCALE_DIVS, aten.tanh.default, aten.to.dtype)):
            return False
        node = node.args[0]
    return False


def _unwrap_softcap(node) -> tuple[fx.Node, float | None]:
    """``mul(tanh(div(w, c)), c)`` -> ``(w, c)``; anything else has no soft-cap."""
    if not (_is_call(node, _SCALE_MULS) and _is_call(node.args[0], aten.tanh.default)):
        if _is_call(node, aten.tanh.default):
            raise NotAttention("soft-cap is div(c) -> tanh -> mul(c)", f"{node.name} is tanh without the mul by c")
        return node, None
    cap_out, tanh = _constant(node.args[1]), node.args[0]
    div = tanh.args[0]
    cap_in = _constant(div.args[1]) if _is_call(div, _SCALE_DIVS) else None
    if cap_out is None or cap_in is None or cap_in != cap_out or not cap_in > 0:
        raise NotAttention("soft-cap is div(c) -> tanh -> mul(c)", f"{node.name} is not tanh(w / c) * c with one c > 0")
    return div.args[0], float(cap_in)


def _unwrap_scale(node) -> tuple[fx.Node, float]:
    """``mul(w, s)`` / ``div(w, d)`` by python constants -> ``(w, s or 1/d)``; none -> scale 1.

    Several in a row (GPT-2's optional ``/ (layer + 1)``) fold into one scale, exact up to rounding.
    """
    scale = 1.0
    while _is_call(node, (*_SCALE_MULS, *_SCALE_DIVS)):
        node, factor = _one_scale(node)
        scale *= factor
    if not math.isfinite(scale):
        raise NotAttention("scale is finite", f"the scores are scaled by {scale}")
    return node, scale


def _one_scale(node: fx.Node) -> tuple[fx.Node, float]:
    if node.target in _SCALE_MULS:
        a, b = node.args[:2]
        w, s = (a, _constant(b)) if isinstance(a, fx.Node) else (b, _constant(a))
        if s is None or not isinstance(w, fx.Node):
            raise NotAttention("scale is a constant", f"{node.name} multiplies the scores by a tensor")
        return w, s
    d = _constant(node.args[1])
    if d is None or d == 0:
        raise NotAttention("scale is a constant", f"{node.name} divides the scores by {_describe(node.args[1])}")
    return node.args[0], 1.0 / d


def _constant(arg) -> float | None:
    return float(arg) if isinstance(arg, (int, float)) and not isinstance(arg, bool) else None


def _untranspose(node) -> fx.Node:
    """``transpose(k, 2, 3)`` / ``transpose(k, -1, -2)`` / ``permute(k, [0, 1, 3, 2])`` -> ``k``."""
    kt = tensor_meta(node)
    if kt is not None and kt.dim() == 4:
        if _is_call(node, aten.transpose.int):
            dims = {d % 4 for d in node.args[1:3]}
            if dims == {2, 3}:
                return node.args[0]
        if _is_call(node, aten.permute.default) and [d % 4 for d in node.args[1]] == [0, 1, 3, 2]:
            return node.args[0]
    raise NotAttention("keys transposed on their last two axes", f"the second matmul operand is {_describe(node)}")


def _is_identity(node: fx.Node, probs: bool = False) -> bool:
    """A step that changes nothing: a same-dtype cast, p=0 or eval-mode dropout, a clone.

    On the ``probs`` side a cast of the float32 probabilities (to the value dtype) also counts: the
    canonical op makes that same cast.
    """
    if _is_call(node, aten.clone.default):
        return True
    if _is_call(node, aten.dropout.default):
        p, train = (list(node.args[1:3]) + [None, None])[:2]
        return p == 0 or train is False
    if _is_call(node, aten.to.dtype) and len(node.args) >= 2:
        source, out = tensor_meta(node.args[0]), tensor_meta(node)
        if source is None or out is None:
            return False
        return source.dtype == out.dtype or (probs and source.dtype == torch.float32)
    return False


def _skip_identities(node) -> tuple[fx.Node, list[fx.Node]]:
    seen = []
    while isinstance(node, fx.Node) and _is_identity(node):
        seen.append(node)
        node = node.args[0]
    return node, seen


def _shape(t: torch.Tensor | None) -> str:
    return "unknown" if t is None else "[" + ",".join(str(d) for d in t.shape) + "]"


def _same(a, b) -> bool:
    return str(a) == str(b)


def _check_shapes(query, key_rep, key, value_rep, value, scores, mask, output) -> None:
    """``q [B,H,T,D]``, ``k [B,Hkv,S,D]``, ``v [B,Hkv,S,Dv]`` with ``H % Hkv == 0``, scores ``[B,H,T,S]``."""
    q, kr, k, vr, v = (tensor_meta(n) for n in (query, key_rep, key, value_rep, value))
    w, out = tensor_meta(scores), tensor_meta(output)
    if any(t is None or t.dim() != 4 for t in (q, kr, k, vr, v, w, out)):
        raise NotAttention("q, k, v of rank 4", f"query {_shape(q)}, key {_shape(kr)}, value {_shape(vr)}")
    if not (_same(q.shape[0], k.shape[0]) and _same(q.shape[0], v.shape[0])):
        raise NotAttention("q, k, v share the batch axis", f"query {_shape(q)}, key {_shape(k)}, value {_shape(v)}")
    # The contracted axes (q/k head dim, k/v sequence) need no check: matmul refuses a mismatch at run
    # time, and export may not prove symbolic lengths equal (past keys and values get separate dims).
    heads, kv_heads = int(q.shape[1]), int(k.shape[1])
    if int(v.shape[1]) != kv_heads or kv_heads < 1 or heads % kv_heads:
        counts = f"{heads} query, {kv_heads} key, {int(v.shape[1])} value heads"
        raise NotAttention("query heads a multiple of KV heads", counts)
    for rep in (kr, vr):  # matmul broadcasts a single head; anything else must already match
        if int(rep.shape[1]) not in (1, heads):
            raise NotAttention("query heads a multiple of KV heads", f"{heads} query heads against {_shape(rep)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise NotAttention("q, k, v share a dtype", f"{q.dtype}, {k.dtype}, {v.dtype}")
    if mask is not None:
        _check_mask(tensor_meta(mask), w)


def _check_mask(m: torch.Tensor | None, scores: torch.Tensor) -> None:
    """An additive float mask that broadcasts to the scores without widening them.

    Only static sizes are compared: export gives the mask's key length and each layer's its own symbol,
    and the add itself refuses a mismatch at run time.
    """
    if m is None or not m.dtype.is_floating_point:
        raise NotAttention("additive float mask", f"mask is {'unknown' if m is None else m.dtype}")
    if m.dim() > 4 or any(
        isinstance(a, int) and a != 1 and isinstance(b, int) and a != b
        for a, b in zip(reversed(m.shape), reversed(scores.shape))
    ):
        raise NotAttention("mask broadcasts to [B,H,T,S]", f"mask {_shape(m)} against scores {_shape(scores)}")
