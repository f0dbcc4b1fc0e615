"""Find the LM head feeding a cross-entropy in a captured training step, and say why when it does not.

What HF causal LMs compute between the last hidden state and the loss (``ForCausalLMLoss``), as the
training IR records it::

    logits = aten.linear(hidden, lm_head_weight)              # [B, T, V]  (a bias on some models)
    logits = aten.mul(aten.tanh(aten.div(logits, s)), s)      # final-logit soft-capping (Gemma 2), optional
    logits = aten.to(logits, float32)                         # the loss's upcast
    targets = aten.view(aten.slice(aten.pad(labels, [0, 1], -100), 1, 1), [-1])   # the causal shift
    loss = aten.cross_entropy_loss(aten.view(logits, [-1, V]), targets, None, 1, -100)

The pattern keys on that computation, not on a model family: from each ``cross_entropy_loss`` it walks
back through ops that only reshape rows, pick rows, cast, or soft-cap each logit, to a linear whose
output dimension is the vocabulary. How the shift is written (labels padded, or logits sliced as older
models did) does not matter: the row ops found on the logits are replayed on the hidden states, and the
loss's own targets are used as they are, so hidden row ``i`` pairs with target ``i`` exactly as logit
row ``i`` did.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

aten = torch.ops.aten

HEAD_OPS = (aten.linear.default,)
LOSS_OP = aten.cross_entropy_loss.default
# Ops that act on logits as whole rows: replayed on the hidden states with the last dim read as D.
ROW_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
ROW_SLICES = (aten.slice.Tensor,)
# Ops that leave the rows' values alone up to dtype (the fused op accumulates in fp32 whatever comes in).
IDENTITIES = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.contiguous.default,
              aten.clone.default, aten.type_as.default, aten.alias.default)
CHECKS = (aten._assert_tensor_metadata.default,)  # users that only check a tensor's metadata
REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


class NoMatch(Exception):
    """A check that failed at a node: which check, and why."""

    def __init__(self, check: str, reason: str):
        super().__init__(f"{check}: {reason}")
        self.check, self.reason = check, reason


@dataclass
class HeadLoss:
    """An LM head and the cross-entropy it feeds, with everything the fused op needs."""

    loss: fx.Node
    head: fx.Node
    hidden: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    targets: fx.Node
    reduction: str
    ignore_index: int
    softcap: float | None
    row_ops: list[fx.Node] = field(default_factory=list)  # head side first: replayed on the hidden states
    chain: list[fx.Node] = field(default_factory=list)  # every node from the head to the loss input
    logit_outputs: list[fx.Node] = field(default_factory=list)  # chain nodes the graph returns


def loss_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target == LOSS_OP]


def match_head_loss(loss: fx.Node) -> HeadLoss:
    """The head and options behind ``loss``, or ``NoMatch`` naming the first node that breaks the pattern."""
    options = loss_options(loss)
    node, chain, row_ops, softcap = loss.args[0], [], [], None
    while not (node.op == "call_function" and node.target in HEAD_OPS):
        chain.append(node)
        if _is_call(node, ROW_RESHAPES + ROW_SLICES):
            row_ops.append(node)
            node = node.args[0]
        elif _is_call(node, IDENTITIES):
            node = node.args[0]
        elif (capped := softcap_input(node)) is not None:
            if softcap is not None:
                raise NoMatch("one soft-cap", f"{node.name} caps logits that {chain[0].name} caps again")
            node, softcap = capped
            chain.extend(_softcap_nodes(chain[-1]))
        else:
            raise NoMatch("LM head feeds the loss", f"{node.name} ({_op(node)}) between the logits and "
                          f"{loss.name} is not a row reshape, row slice, cast or soft-cap")
    head = node
    chain.append(head)
    match = HeadLoss(loss=loss, head=head, hidden=head.args[0], weight=head.args[1],
                     bias=head.args[2] if len(head.args) > 2 else None, targets=loss.args[1],
                     softcap=softcap, row_ops=row_ops[::-1], chain=chain[::-1], **options)
    check_rows(match)
    match.logit_outputs = check_users(match)
    return match


def loss_options(loss: fx.Node) -> dict:
    """``reduction`` and ``ignore_index`` of an ``aten.cross_entropy_loss`` call; class weights and label
    smoothing are refused (the fused op computes plain cross-entropy)."""
    names = ("self", "target", "weight", "reduction", "ignore_index", "label_smoothing")
    values = {"weight": None, "reduction": 1, "ignore_index": -100, "label_smoothing": 0.0}
    values.update(dict(zip(names, loss.args)))
    values.update(loss.kwargs)
    if values["weight"] is not None:
        raise NoMatch("no class weights", f"{loss.name} weighs classes with {values['weight']}")
    if values["label_smoothing"]:
        raise NoMatch("no label smoothing", f"{loss.name} smooths labels by {values['label_smoothing']}")
    return {"reduction": REDUCTIONS[int(values["reduction"])], "ignore_index": int(values["ignore_index"])}


def softcap_input(node: fx.Node) -> tuple[fx.Node, float] | None:
    """``(x, s)`` when ``node`` computes ``tanh(x / s) * s`` (``* (1/s)`` for the division too), else None."""
    scale = _scalar_operand(node, (aten.mul.Tensor, aten.mul.Scalar))
    if scale is None or not _is_call(node.args[0], (aten.tanh.default,)):
        return None
    inner = node.args[0].args[0]
    divisor = _scalar_operand(inner, (aten.div.Tensor, aten.div.Scalar))
    if divisor is None:
        factor = _scalar_operand(inner, (aten.mul.Tensor, aten.mul.Scalar))
        divisor = 1.0 / factor if factor else None
    if divisor is None or not abs(divisor - scale) <= 1e-6 * abs(scale):
        return None
    return inner.args[0], float(scale)


def _softcap_nodes(capped: fx.Node) -> list[fx.Node]:
    tanh = capped.args[0]
    return [tanh, tanh.args[0]]


def _scalar_operand(node: fx.Node, targets) -> float | None:
    if not _is_call(node, targets) or len(node.args) != 2 or not isinstance(node.args[1], (int, float)):
        return None
    return float(node.args[1])


def check_rows(match: HeadLoss) -> None:
    """Row ops must keep the vocabulary the last dim (a slice of the vocabulary is another loss)."""
    vocab = match.weight.meta["val"].shape[0]
    for node in match.row_ops:
        val = node.meta.get("val")
        rank = node.args[0].meta["val"].dim()
        if node.target in ROW_SLICES and _dim(node.args[1], rank) == rank - 1:
            raise NoMatch("row ops only", f"{node.name} slices the vocabulary dim")
        if val is None or val.shape[-1] != vocab:
            raise NoMatch("row ops only", f"{node.name} ({_op(node)}) does not keep the vocabulary as the last dim")


def check_users(match: HeadLoss) -> list[fx.Node]:
    """Every intermediate of the chain must feed only the next one, metadata checks or the graph output;
    returns the chain nodes the graph outputs (logits the pass can drop). Any other user is a ``NoMatch``."""
    inside = set(match.chain) | {match.loss}
    returned = []
    for node in match.chain:
        for user in node.users:
            if user in inside or _is_call(user, CHECKS):
                continue
            if user.op == "output":
                returned.append(node)
                continue
            raise NoMatch("logits used only by the loss", f"{node.name} (logits) is also read by {user.name} "
                          f"({_op(user)})")
    return returned


def replay_rows(graph: fx.Graph, match: HeadLoss, hidden: fx.Node) -> fx.Node:
    """Apply the row ops found on the logits to ``hidden`` (the last dim being ``D``, not ``V``), so each
    hidden row lines up with the same target the logit row did. ``reshape`` stands in for ``view``: a
    view of sliced hidden states may need a copy where the logits' did not."""
    features = match.weight.meta["val"].shape[1]
    for node in match.row_ops:
        if node.target in ROW_SLICES:
            hidden = graph.call_function(node.target, (hidden, *node.args[1:]), dict(node.kwargs))
        else:
            shape = [*node.args[1][:-1], features]
            hidden = graph.call_function(aten.reshape.default, (hidden, shape))
    return hidden


def _dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _op(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_function" and node.target is not operator.getitem else node.op
