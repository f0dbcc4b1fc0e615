"""Cut Cross-Entropy's graph op: the LM head and the cross-entropy fused, with autograd, no ``N x V`` logits.

``tokenpass::linear_cross_entropy(hidden, weight, targets, bias, ignore_index, softcap, reduction, shift,
filter_eps) -> (loss, lse)`` computes ``cross_entropy(softcap(hidden @ weight.T + bias), targets)`` with
HF's causal ``shift`` (row ``t`` predicts ``targets[t + shift]``). ``lse`` (batch-shaped, fp32, 0 at
ignored rows) is the second, differentiable output a z-loss needs. The loss is fp32 whatever the input
dtype (HF upcasts logits before its loss too).

The backward is its own op, ``tokenpass::linear_cross_entropy_backward``, so a captured training step
keeps both halves opaque (fake implementations give shapes; no data-dependent compaction is traced).
Both dispatch to the Triton kernels on CUDA (``tokenpass/kernels/linear_cross_entropy.py``) and to the
chunked torch path elsewhere (``tokenpass/kernels/linear_cross_entropy_ref.py``). ``filter_eps`` here is
a resolved threshold or None (exact); ``linear_cross_entropy`` below resolves ``"auto"`` per dtype.

``tokenpass::linear_cross_entropy_fused`` (same arguments less ``filter_eps``, scalar reductions only)
is the CPU's faster variant: it computes the gradients together with the loss (three matmuls per chunk
instead of four) and its backward only scales them; ``linear_cross_entropy`` picks it on the CPU when a
scalar loss will be differentiated. It runs the torch path on any device (the kernels' design, with
its per-tile filtering, is the recomputing backward).

Gradients are plain autograd gradients of the op's inputs, so a weight that is also the input
embedding (tied heads) gets the sum of both uses' gradients from autograd's own accumulation.
"""

from __future__ import annotations

import math
from typing import Callable, TypeVar

import torch

from tokenpass.errors import TokenpassError
from tokenpass.kernels import linear_cross_entropy_ref as ref
from tokenpass.kernels.linear_cross_entropy_ref import Rows

LINEAR_CROSS_ENTROPY = "tokenpass::linear_cross_entropy"
LINEAR_CROSS_ENTROPY_BACKWARD = "tokenpass::linear_cross_entropy_backward"

torch.library.define(
    LINEAR_CROSS_ENTROPY,
    "(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias=None, int ignore_index=-100, float? softcap=None, "
    "str reduction='mean', int shift=0, float? filter_eps=None) -> (Tensor, Tensor)",
)
torch.library.define(
    LINEAR_CROSS_ENTROPY_BACKWARD,
    "(Tensor grad_loss, Tensor? grad_lse, Tensor hidden, Tensor weight, Tensor targets, Tensor lse, Tensor? bias, "
    "int ignore_index, float? softcap, str reduction, int shift, float? filter_eps) -> (Tensor, Tensor, Tensor?)",
)

T = TypeVar("T")


def _user_error(fn: Callable[[], T]) -> T:
    """Run an argument check from the kernels layer, re-raising its ``ValueError`` as a one-line
    ``TokenpassError`` (what the CLI and ``optimize`` report without a traceback)."""
    try:
        return fn()
    except ValueError as error:
        raise TokenpassError(f"linear_cross_entropy: {error}") from None


def _loss_dtype(hidden: torch.Tensor) -> torch.dtype:
    return ref.accumulation_dtype(hidden.dtype)


def _uses_kernels(hidden: torch.Tensor) -> bool:
    return hidden.device.type == "cuda"


def _rows(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, shift: int) -> Rows:
    return _user_error(lambda: ref.prepare_rows(hidden, targets, weight.shape[0], ignore_index, shift))


def _lse_forward(rows: Rows, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None):
    """``(lse, target_logit)`` of the compacted rows: Triton on CUDA, the chunked torch path elsewhere."""
    if _uses_kernels(rows.hidden):
        from tokenpass.kernels.linear_cross_entropy import lse_forward

        return lse_forward(rows.hidden, weight, rows.targets, bias, softcap)
    return ref.chunked_lse_forward(rows.hidden, weight, rows.targets, bias, softcap)


def _backward(rows: Rows, weight, bias, lse_rows, grad_nll, grad_lse, softcap, filter_eps):
    """Accumulation-dtype ``(dE rows, dC, dbias)``: Triton on CUDA, the chunked torch path elsewhere."""
    if _uses_kernels(rows.hidden):
        from tokenpass.kernels.linear_cross_entropy import backward

        return backward(rows.hidden, weight, rows.targets, lse_rows, grad_nll, grad_lse, bias, softcap, filter_eps)
    return ref.chunked_backward(rows.hidden, weight, rows.targets, lse_rows, grad_nll, grad_lse, bias, softcap,
                                filter_eps)


@torch.library.impl(LINEAR_CROSS_ENTROPY, "CompositeExplicitAutograd")
def linear_cross_entropy_op(hidden, weight, targets, bias=None, ignore_index=-100, softcap=None, reduction="mean",
                            shift=0, filter_eps=None):
    _user_error(lambda: ref.check_arguments(hidden, weight, targets, bias, softcap, reduction, shift))
    rows = _rows(hidden, weight, targets, ignore_index, shift)
    lse, target_logit = _lse_forward(rows, weight, bias, softcap)
    dtype = _loss_dtype(hidden)
    loss = ref.reduce_rows((lse - target_logit).to(dtype), rows, reduction)
    return loss, ref.scatter_rows(lse.to(dtype), rows)


@torch.library.register_fake(LINEAR_CROSS_ENTROPY)
def _linear_cross_entropy_fake(hidden, weight, targets, bias=None, ignore_index=-100, softcap=None, reduction="mean",
                               shift=0, filter_eps=None):
    dtype = _loss_dtype(hidden)
    loss_shape = hidden.shape[:-1] if reduction == "none" else ()
    return hidden.new_empty(loss_shape, dtype=dtype), hidden.new_empty(hidden.shape[:-1], dtype=dtype)


@torch.library.impl(LINEAR_CROSS_ENTROPY_BACKWARD, "CompositeExplicitAutograd")
def linear_cross_entropy_backward_op(grad_loss, grad_lse, hidden, weight, targets, lse, bias, ignore_index, softcap,
                                     reduction, shift, filter_eps):
    rows = _rows(hidden, weight, targets, ignore_index, shift)
    grad_nll = ref.row_loss_grad(grad_loss, rows, reduction)
    grad_lse_rows = None if grad_lse is None else grad_lse.reshape(-1).index_select(0, rows.index)
    lse_rows = lse.reshape(-1).index_select(0, rows.index)
    d_rows, d_weight, d_bias = _backward(rows, weight, bias, lse_rows, grad_nll, grad_lse_rows, softcap, filter_eps)
    d_hidden = ref.scatter_rows(d_rows.to(hidden.dtype), rows).view(hidden.shape)
    return d_hidden, d_weight.to(weight.dtype), None if d_bias is None else d_bias.to(bias.dtype)


@torch.library.register_fake(LINEAR_CROSS_ENTROPY_BACKWARD)
def _linear_cross_entropy_backward_fake(grad_loss, grad_lse, hidden, weight, targets, lse, bias, ignore_index, softcap,
                                        reduction, shift, filter_eps):
    return torch.empty_like(hidden), torch.empty_like(weight), None if bias is None else torch.empty_like(bias)


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, targets, bias, ignore_index, softcap, reduction, shift, filter_eps = _full_args(*inputs)
    ctx.save_for_backward(hidden, weight, targets, bias, output[1])
    ctx.options = (ignore_index, softcap, reduction, shift, filter_eps)
    ctx.set_materialize_grads(False)  # an unused ``lse`` output costs nothing in the backward


def _full_args(hidden, weight, targets, bias=None, ignore_index=-100, softcap=None, reduction="mean", shift=0,
               filter_eps=None):
    return hidden, weight, targets, bias, ignore_index, softcap, reduction, shift, filter_eps


def _backward_formula(ctx, grad_loss, grad_lse):
    hidden, weight, targets, bias, lse = ctx.saved_tensors
    ignore_index, softcap, reduction, shift, filter_eps = ctx.options
    if grad_loss is None:
        grad_loss = lse.new_zeros(hidden.shape[:-1] if reduction == "none" else ())
    d_hidden, d_weight, d_bias = torch.ops.tokenpass.linear_cross_entropy_backward(
        grad_loss, grad_lse, hidden, weight, targets, lse, bias, ignore_index, softcap, reduction, shift, filter_eps
    )
    return d_hidden, d_weight, None, d_bias, None, None, None, None, None


torch.library.register_autograd(LINEAR_CROSS_ENTROPY, _backward_formula, setup_context=_setup_context)

linear_cross_entropy_op_overload = torch.ops.tokenpass.linear_cross_entropy.default


# The CPU's one-pass variant: loss and the gradients of a scalar loss together (three matmuls per chunk,
# not the forward-then-recompute four). The gradients leave as extra outputs the wrapper hides; the
# backward scales them in place by the upstream gradient, so they are used once (like torch's chunked
# ``linear_cross_entropy``, a second backward through the same graph is an error).
LINEAR_CROSS_ENTROPY_FUSED = "tokenpass::linear_cross_entropy_fused"
torch.library.define(
    LINEAR_CROSS_ENTROPY_FUSED,
    "(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias=None, int ignore_index=-100, float? softcap=None, "
    "str reduction='mean', int shift=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)


@torch.library.impl(LINEAR_CROSS_ENTROPY_FUSED, "CompositeExplicitAutograd")
def linear_cross_entropy_fused_op(hidden, weight, targets, bias=None, ignore_index=-100, softcap=None,
                                  reduction="mean", shift=0):
    _user_error(lambda: ref.check_arguments(hidden, weight, targets, bias, softcap, reduction, shift))
    if reduction == "none":
        raise TokenpassError("linear_cross_entropy_fused: reduction must be 'sum' or 'mean' (per-row losses need "
                             "per-row gradients: use tokenpass::linear_cross_entropy)")
    rows = _rows(hidden, weight, targets, ignore_index, shift)
    lse, target_logit, d_hidden, d_weight, d_bias = ref.chunked_forward_backward(
        rows.hidden, weight, rows.targets, bias, softcap, scatter_index=rows.index,
        scatter_rows_total=math.prod(rows.batch_shape))
    dtype = _loss_dtype(hidden)
    if reduction == "mean":  # fold 1 / count in now: the backward then needs no row count
        for grad in (d_hidden, d_weight, d_bias):
            if grad is not None:
                grad.div_(rows.index.shape[0])
    loss = ref.reduce_rows((lse - target_logit).to(dtype), rows, reduction)
    d_bias = d_weight.new_empty(0) if d_bias is None else d_bias
    return loss, ref.scatter_rows(lse.to(dtype), rows), d_hidden.view(hidden.shape), d_weight, d_bias


@torch.library.register_fake(LINEAR_CROSS_ENTROPY_FUSED)
def _linear_cross_entropy_fused_fake(hidden, weight, targets, bias=None, ignore_index=-100, softcap=None,
                                     reduction="mean", shift=0):
    dtype = _loss_dtype(hidden)
    return (hidden.new_empty((), dtype=dtype), hidden.new_empty(hidden.shape[:-1], dtype=dtype),
            hidden.new_empty(hidden.shape, dtype=dtype), weight.new_empty(weight.shape, dtype=dtype),
            weight.new_empty((0,) if bias is None else bias.shape, dtype=dtype))


def _fused_setup_context(ctx, inputs, output) -> None:
    hidden, weight, targets, bias, ignore_index, softcap, reduction, shift, _ = _full_args(*inputs)
    ctx.save_for_backward(hidden, weight, targets, bias, output[1])
    ctx.options = (ignore_index, softcap, reduction, shift, None)
    ctx.grads = output[2:]
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, grad_loss, grad_lse, *_):
    if grad_lse is not None or grad_loss is None:  # a z-loss (or only lse) needs the recomputing backward
        return _backward_formula(ctx, grad_loss, grad_lse)[:8]
    if ctx.grads is None:
        raise TokenpassError("linear_cross_entropy_fused: its gradients were already used by a backward; "
                             "use tokenpass::linear_cross_entropy to backward twice")
    hidden, weight, _, bias, _ = ctx.saved_tensors
    d_hidden, d_weight, d_bias = (grad.mul_(grad_loss) for grad in ctx.grads)
    ctx.grads = None
    return (d_hidden.to(hidden.dtype), d_weight.to(weight.dtype), None,
            None if bias is None else d_bias.to(bias.dtype), None, None, None, None)


torch.library.register_autograd(LINEAR_CROSS_ENTROPY_FUSED, _fused_backward, setup_context=_fused_setup_context)
linear_cross_entropy_fused_overload = torch.ops.tokenpass.linear_cross_entropy_fused.default


def _wants_fused(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reduction: str) -> bool:
    """The one-pass op: on the CPU, for a scalar loss whose gradients will be asked for, where its
    whole-vocabulary chunks are tall enough to pay off (``ref.fused_pays_off``)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    return (needs_grad and reduction != "none" and not _uses_kernels(hidden)
            and ref.fused_pays_off(weight.shape[0]))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: int = 0,
    filter_eps: float | str | None = "auto",
    return_lse: bool = False,
    fused: bool | None = None,
):
    """The op with ``filter_eps`` resolved (``"auto"``: ``finfo(dtype).eps / 32``; None: exact gradients).

    Returns the loss, or ``(loss, lse)`` with ``return_lse`` (e.g. ``loss + 1e-4 * lse.pow(2).mean()``).
    ``fused`` picks ``tokenpass::linear_cross_entropy_fused`` (gradients computed in the forward; no
    filtering); None: on the CPU for a scalar loss under autograd, where it is faster.
    """
    eps = _user_error(lambda: ref.resolve_filter_eps(filter_eps, hidden.dtype))
    if fused is None:
        fused = _wants_fused(hidden, weight, bias, reduction)
    if fused:
        loss, lse, *_ = linear_cross_entropy_fused_overload(hidden, weight, targets, bias, ignore_index, softcap,
                                                            reduction, shift)
        return (loss, lse) if return_lse else loss
    loss, lse = linear_cross_entropy_op_overload(hidden, weight, targets, bias, ignore_index, softcap, reduction, shift,
                                                 eps)
    return (loss, lse) if return_lse else loss
