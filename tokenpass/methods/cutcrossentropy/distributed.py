"""Vocabulary-parallel Cut Cross-Entropy: the LM head sharded by vocabulary across a process group.

Why: with tensor parallelism the head ``C [V, D]`` is split by rows, rank ``r`` holding ``C[v_r : v_r + V_r]``
(and the matching bias slice), while every rank holds the full hidden states ``E [N, D]`` and targets
``[N]``. The loss must still be ``cross_entropy(softcap(E @ C.T + b), targets)`` of the whole vocabulary,
and no rank may hold even its ``N x V_r`` logits at once (the chunked helpers of
``tokenpass/kernels/linear_cross_entropy_ref.py``, or the Triton kernels on CUDA, each see one shard).

The combine. Each rank computes, over its shard only, ``lse_r = log sum_{v in shard} exp(z_v)`` and
``t_r = z_target`` if the row's target falls in its shard, else 0. Then, per row,

    m   = max_r lse_r                               (all-reduce MAX)
    lse = m + log sum_r exp(lse_r - m)              (all-reduce SUM of the exp terms)
    z_t = sum_r t_r                                 (all-reduce SUM: exactly one rank holds the target)
    nll = lse - z_t

which is the logsumexp identity ``log sum_v exp z_v = log sum_r exp lse_r`` made stable by ``m``. The
soft-cap is elementwise, so capping each shard's logits is capping the full logits.

What is communicated. Forward: two collectives over the compacted (non-ignored) rows ``R <= N``: a MAX of
one ``[R]`` vector and a SUM of ``[2R + 1]`` (the exp terms, the target logits, and this rank's shard
length: their sum must be ``vocab_size``, which catches a missing or doubled shard, otherwise a silently
wrong loss), in the accumulation dtype (fp32, fp64 for fp64 inputs). Backward: with the
global ``lse`` each rank forms ``d = g * (softmax - onehot)`` for its shard's columns only; ``dC_shard =
d^T @ E`` and ``dbias_shard = sum(d)`` need nothing from other ranks, and ``dE = sum_r d_r @ C_r`` is one
SUM all-reduce of an ``[R, D]`` accumulation-dtype tensor (every rank gets the full ``dE``, as its
replicated ``E`` requires: the all-reduce a Megatron "copy to tensor-parallel region" does in its backward,
done here). The ``R`` rows are the same on every rank because targets are replicated: a caller that
passes different targets per rank breaks the collectives' shapes (the contract, not checked).

Why not DTensor. ``torch.distributed.tensor.parallel.loss_parallel`` computes a cross-entropy over logits
``Shard(-1)``-sharded by vocabulary with the same MAX / SUM combine. Tried on two gloo CPU ranks (torch
2.13): ``torch.matmul`` of a ``Replicate()`` hidden DTensor with a ``Shard(0)`` head's transpose gives those
logits and, under ``loss_parallel()``, ``F.cross_entropy`` matches the single-process loss; but its input is
the logits, so each rank materialises its ``N x V/W`` block (and its gradient) before the loss starts,
which is exactly what Cut Cross-Entropy exists to avoid (N 8192, V 256000 over 8 ranks: about 1 GiB of
fp32 per rank, twice with the gradient). It also has no ``shift``, soft-cap or LSE output. So this is the
same combine written out: an ``autograd.Function`` over plain tensors and ``torch.distributed.all_reduce``
(written for eager; not tried under ``torch.compile``), reusing the single-process op's row preparation,
per-shard LSE and backward, so the logits exist only chunk by chunk.

Limits: no gradient filtering (the backward is exact; ``filter_eps`` would be a local per-tile decision
and could be passed through, but is not offered untested); no fused one-pass variant (its per-chunk
whole-vocabulary softmax needs the global LSE first, one all-reduce per chunk). On CUDA the per-shard
work runs in the Triton kernels through ``ops`` (they compare targets with the tile's columns, so a target
outside the shard, a negative or too-large local index, is never hit); that path is untested: these tests
ran on CPU ranks only.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from tokenpass.errors import TokenpassError
from tokenpass.kernels import linear_cross_entropy_ref as ref
from tokenpass.kernels.linear_cross_entropy_ref import Rows
from tokenpass.methods.cutcrossentropy import ops

NAME = "vocab_parallel_linear_cross_entropy"

T = TypeVar("T")


def _user_error(fn: Callable[[], T]) -> T:
    """A kernels-layer ``ValueError`` as this function's one-line ``TokenpassError``."""
    try:
        return fn()
    except ValueError as error:
        raise TokenpassError(f"{NAME}: {error}") from None


def shard_vocab(weight: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, int]:
    """``(rows of weight for rank, vocab_start)``: the first ``V % world_size`` ranks get one row more.

    Works for a bias (any tensor split along dim 0). The shard is a view: ``.clone()`` it to make an
    independent parameter.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise TokenpassError(f"shard_vocab: rank must be in [0, world_size) with world_size >= 1, got rank {rank} "
                             f"and world_size {world_size}")
    base, extra = divmod(weight.shape[0], world_size)
    start = rank * base + min(rank, extra)
    return weight.narrow(0, start, base + (rank < extra)), start


def _check_shard(hidden: torch.Tensor, weight_shard: torch.Tensor, bias_shard: torch.Tensor | None,
                 vocab_start: int, vocab_size: int) -> None:
    """The shard-specific arguments, named as the caller passed them; the rest is ``ref.check_arguments``."""
    if weight_shard.dim() != 2:
        raise TokenpassError(f"{NAME}: weight_shard must be [vocab_shard, features], got shape "
                             f"{tuple(weight_shard.shape)}")
    if hidden.dim() < 1 or weight_shard.shape[1] != hidden.shape[-1]:
        raise TokenpassError(f"{NAME}: weight_shard has {weight_shard.shape[1]} features but hidden has "
                             f"{hidden.shape[-1] if hidden.dim() else 'none'} (shapes {tuple(weight_shard.shape)} "
                             f"and {tuple(hidden.shape)})")
    if bias_shard is not None and bias_shard.shape != (weight_shard.shape[0],):
        raise TokenpassError(f"{NAME}: bias_shard must be [{weight_shard.shape[0]}] like weight_shard's rows, got "
                             f"{tuple(bias_shard.shape)}")
    if not 0 <= vocab_start <= vocab_start + weight_shard.shape[0] <= vocab_size:
        raise TokenpassError(f"{NAME}: vocab_start {vocab_start} with a {weight_shard.shape[0]}-row shard must lie "
                             f"within vocab_size {vocab_size}")


def _global_lse(rows: Rows, weight_shard: torch.Tensor, bias_shard: torch.Tensor | None, softcap: float | None,
                vocab_size: int, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, target_logit)`` of the whole vocabulary, ``[R]``, from this shard's and the group's partials.

    ``rows.targets`` are local (shifted by ``-vocab_start``): outside ``[0, V_shard)`` they contribute 0.
    """
    lse_shard, target_shard = ops._lse_forward(rows, weight_shard, bias_shard, softcap)
    row_max = lse_shard.clone()
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    # -inf only if every shard is empty (the length check below reports it); avoids -inf - -inf = NaN first
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    count = rows.targets.shape[0]
    packed = torch.cat([torch.exp(lse_shard - row_max), target_shard, lse_shard.new_full((1,), weight_shard.shape[0])])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    tiled = round(packed[-1].item())
    if tiled != vocab_size:
        raise TokenpassError(f"{NAME}: the group's weight shards hold {tiled} vocabulary rows in all but vocab_size "
                             f"is {vocab_size} (each rank must pass its own disjoint shard)")
    return row_max + torch.log(packed[:count]), packed[count:2 * count]


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """``(loss, lse)``; gradients for hidden (all-reduced), weight_shard and bias_shard (local)."""

    @staticmethod
    def forward(ctx, hidden, weight_shard, targets, bias_shard, vocab_start, vocab_size, ignore_index, softcap,
                reduction, shift, group):
        rows = _user_error(lambda: ref.prepare_rows(hidden, targets, vocab_size, ignore_index, shift))
        rows = rows._replace(targets=rows.targets - vocab_start)
        lse, target_logit = _global_lse(rows, weight_shard, bias_shard, softcap, vocab_size, group)
        ctx.save_for_backward(hidden, weight_shard, bias_shard, rows.index, rows.targets, lse)
        ctx.options = (reduction, softcap, group)
        ctx.set_materialize_grads(False)  # an unused ``lse`` output costs nothing in the backward
        return ref.reduce_rows(lse - target_logit, rows, reduction), ref.scatter_rows(lse, rows)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, weight_shard, bias_shard, index, local_targets, lse = ctx.saved_tensors
        reduction, softcap, group = ctx.options
        rows = Rows(hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), local_targets, index,
                    hidden.shape[:-1])
        if grad_loss is None:
            grad_loss = lse.new_zeros(hidden.shape[:-1] if reduction == "none" else ())
        grad_nll = ref.row_loss_grad(grad_loss, rows, reduction)
        grad_lse_rows = None if grad_lse is None else grad_lse.reshape(-1).index_select(0, index)
        d_rows, d_weight, d_bias = ops._backward(rows, weight_shard, bias_shard, lse, grad_nll, grad_lse_rows, softcap,
                                                 None)
        dist.all_reduce(d_rows, op=dist.ReduceOp.SUM, group=group)  # in the accumulation dtype, then cast
        d_hidden = ref.scatter_rows(d_rows.to(hidden.dtype), rows).view(hidden.shape)
        d_bias = None if d_bias is None else d_bias.to(bias_shard.dtype)
        return d_hidden, d_weight.to(weight_shard.dtype), None, d_bias, None, None, None, None, None, None, None


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    vocab_size: int,
    bias_shard: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: int = 0,
    group: dist.ProcessGroup | None = None,
    return_lse: bool = False,
):
    """``linear_cross_entropy`` of the full head when this rank holds rows ``[vocab_start, vocab_start + V_shard)``.

    Every rank of ``group`` (None: the default group) calls it with the same ``hidden``, ``targets`` and
    options and its own disjoint shard (``shard_vocab`` gives an even split; uneven ones are fine). The
    loss (fp32, fp64 for fp64 inputs) and ``lse`` are the same on every rank; ``hidden``'s gradient is the
    full one on every rank, ``weight_shard``'s and ``bias_shard``'s are the shard's. Arguments are
    checked before any collective, so a call that is wrong on every rank fails at once everywhere (one
    wrong on a single rank leaves the others waiting in the first all-reduce until the group's timeout).
    """
    _check_shard(hidden, weight_shard, bias_shard, vocab_start, vocab_size)
    _user_error(lambda: ref.check_arguments(hidden, weight_shard, targets, bias_shard, softcap, reduction, shift))
    loss, lse = _VocabParallelLinearCrossEntropy.apply(hidden, weight_shard, targets, bias_shard, vocab_start,
                                                       vocab_size, ignore_index, softcap, reduction, shift, group)
    return (loss, lse) if return_lse else loss
