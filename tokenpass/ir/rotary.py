"""Find the rotary position embedding (RoPE) a graph applies to an attention site's keys.

A method that moves keys to other positions than the ones they were rotated at (contiguous
re-positioning: TokenSelect, StreamingLLM's pos-shift) rotates them again by the difference, which
needs the frequencies and how many leading dims rotate. Those are read from what the graph computes,
not from a model family: the keys are ``x * cos(A) + rotate_half(x) * sin(A)`` (optionally on the
first ``rot_dim`` dims only, the rest concatenated unrotated: partial rotary), with
``A = cat([F, F], -1)`` and ``F`` computed from the step's ``position_ids`` and one 1-D float
buffer of ``rot_dim / 2`` frequencies.

Before (keys of one layer, as Hugging Face's ``apply_rotary_pos_emb`` exports)::

    freqs = mul(position_ids[..., None], inv_freq)          # or inv_freq @ position_ids, transposed
    angle = cat([freqs, freqs], -1)
    cos, sin = cos(angle) * s, sin(angle) * s                 # s: the attention scaling, often 1
    k = add(mul(x, cos), mul(cat([neg(x[..., h:]), x[..., :h]], -1), sin))

``key_rotary`` returns ``Rotary(inv_freq="b_..._inv_freq", rot_dim=2h)``, or the reason it found none
(learned absolute positions, ALiBi, interleaved pairs, a pattern it does not know).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from tokenpass.ir.sites import tensor_meta

aten = torch.ops.aten
POSITIONS_INPUT = "position_ids"  # the step's positions (``capture.STEP_ARGS``)
# Single-tensor ops that carry the cos/sin factor to the multiply without changing which angle it is
# (layout, casts, the attention-scaling multiply by a constant).
_CARRIERS = {
    aten.unsqueeze.default,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.expand.default,
    aten.slice.Tensor,
    aten.transpose.int,
    aten.to.dtype,
    aten.to.device,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.mul.Tensor,
    aten.mul.Scalar,
}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default, aten.contiguous.default}
_MAX_ANGLE_DEPTH = 12


@dataclass(frozen=True)
class Rotary:
    """The rotation on a site's keys: frequencies ``inv_freq`` (a graph node, ``[rot_dim / 2]``) applied
    half-split (``rotate_half``) to the first ``rot_dim`` dims of each head."""

    inv_freq: str
    rot_dim: int


def key_rotary(key: fx.Node) -> Rotary | str:
    """The rotary embedding that produced ``key`` (new keys after position encoding), or why none."""
    node = _strip(key, _CASTS)
    x, rot_dim, rotated = node, None, node
    if node.target == aten.cat.default and _last_dim(node, node.args[1] if len(node.args) > 1 else 0):
        parts = node.args[0]
        if len(parts) != 2:
            return f"keys {key.name} are a concatenation of {len(parts)} parts, not rotated + pass-through dims"
        rotated, passed = _strip(parts[0], _CASTS), parts[1]
        if not _is_slice(passed, start=_dim(parts[0])):
            return f"keys {key.name} concatenate {passed.name}, not the unrotated tail of the same keys"
        x, rot_dim = passed.args[0], _dim(parts[0])
    match = _match_rotation(rotated)
    if isinstance(match, str):
        return f"keys {key.name}: {match}"
    source, angle = match
    if rot_dim is not None and not _is_slice(source, start=0, end=rot_dim, of=x):
        return f"keys {key.name} rotate {source.name}, not the leading {rot_dim} dims of {x.name}"
    return _frequencies(angle, _dim(rotated), key.name)


def _match_rotation(node: fx.Node) -> tuple[fx.Node, fx.Node] | str:
    """``x * cos(A) + rotate_half(x) * sin(A)`` -> ``(x, A)``, either order of every operand."""
    if node.target != aten.add.Tensor or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return f"{node.name} is not the sum x * cos + rotate_half(x) * sin of a rotary embedding"
    terms = [_trig_product(a) for a in node.args[:2]]
    if any(t is None for t in terms):
        return f"{node.name} adds terms that are not a tensor times cos/sin of an angle"
    by_fn = {fn: (operand, angle) for fn, operand, angle in terms}
    if set(by_fn) != {aten.cos.default, aten.sin.default}:
        return f"{node.name} does not add one cos term and one sin term"
    (x, cos_angle), (halved, sin_angle) = by_fn[aten.cos.default], by_fn[aten.sin.default]
    if cos_angle is not sin_angle:
        return f"{node.name} takes cos and sin of different angles"
    if not _is_rotate_half(halved, x):
        return f"{node.name}'s sin term multiplies {halved.name}, not rotate_half of {x.name} (interleaved pairs?)"
    return x, cos_angle


def _trig_product(node: fx.Node) -> tuple[object, fx.Node, fx.Node] | None:
    """``mul(t, carried(cos(A)))`` -> ``(cos, t, A)`` (likewise sin), either operand order."""
    if node.target != aten.mul.Tensor or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return None
    for factor, operand in (node.args[:2], node.args[1::-1]):
        trig = _through_carriers(factor)
        if trig is not None and trig.target in (aten.cos.default, aten.sin.default):
            return trig.target, operand, trig.args[0]
    return None


def _through_carriers(node: fx.Node) -> fx.Node | None:
    """Follow ``node``'s single tensor input back through carrier ops to the op that made the factor."""
    for _ in range(_MAX_ANGLE_DEPTH):
        if node.op != "call_function" or node.target not in _CARRIERS:
            return node
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if len(tensors) != 1:
            return node
        node = tensors[0]
    return None


def _is_rotate_half(node: fx.Node, x: fx.Node) -> bool:
    """``cat([neg(x[..., h:]), x[..., :h]], -1)`` with ``2h`` the last dim of ``x``."""
    if node.target != aten.cat.default or not _last_dim(node, node.args[1] if len(node.args) > 1 else 0):
        return False
    parts = node.args[0]
    if len(parts) != 2 or parts[0].target != aten.neg.default:
        return False
    half = _dim(x) // 2
    return _is_slice(parts[0].args[0], start=half, of=x) and _is_slice(parts[1], start=0, end=half, of=x)


def _frequencies(angle: fx.Node, rot_dim: int, key: str) -> Rotary | str:
    """``A = cat([F, F], -1)``, ``F`` from the positions and one ``[rot_dim / 2]`` float buffer."""
    angle = _strip(angle, _CASTS)
    if angle.target != aten.cat.default or len(angle.args[0]) != 2 or angle.args[0][0] is not angle.args[0][1]:
        return f"keys {key}: the rotary angle {angle.name} is not cat([freqs, freqs])"
    leaves = _placeholders(angle.args[0][0])
    frequencies = [n for n in leaves if n.name != POSITIONS_INPUT and _is_frequency_vector(n, rot_dim // 2)]
    if POSITIONS_INPUT not in {n.name for n in leaves}:
        return f"keys {key}: the rotary angle {angle.name} does not depend on {POSITIONS_INPUT}"
    if len(frequencies) != 1:
        return f"keys {key}: the rotary angle {angle.name} reads {len(frequencies)} [{rot_dim // 2}] frequency inputs"
    return Rotary(frequencies[0].name, rot_dim)


def _placeholders(node: fx.Node) -> list[fx.Node]:
    seen, stack, found = set(), [node], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            found.append(n)
        stack.extend(n.all_input_nodes)
    return found


def _is_frequency_vector(node: fx.Node, size: int) -> bool:
    val = tensor_meta(node)
    return val is not None and val.dim() == 1 and val.shape[0] == size and val.is_floating_point()


def _strip(node: fx.Node, ops: set) -> fx.Node:
    while node.op == "call_function" and node.target in ops:
        node = node.args[0]
    return node


def _dim(node: fx.Node) -> int:
    val = tensor_meta(node)
    return -1 if val is None else int(val.shape[-1])


def _last_dim(node: fx.Node, dim: int) -> bool:
    val = tensor_meta(node)
    return val is not None and dim in (-1, val.dim() - 1)


def _is_slice(node: fx.Node, start: int, end: int | None = None, of: fx.Node | None = None) -> bool:
    """``node`` is ``of[..., start:end]`` (``end`` None: to the end) along the last dim."""
    if isinstance(node, fx.Node) and node.target == aten.alias.default:  # x[..., :full] exports as an alias
        return (of is None or node.args[0] is of) and start == 0 and end in (None, _dim(node.args[0]))
    if not isinstance(node, fx.Node) or node.target != aten.slice.Tensor or len(node.args) < 3:
        return False
    source = node.args[0]
    if of is not None and source is not of:
        return False
    if not _last_dim(source, node.args[1]) or node.args[2] != start:
        return False
    stop = node.args[3] if len(node.args) > 3 else None
    full = _dim(source)
    return min(full if stop is None else stop, full) == (full if end is None else end)
