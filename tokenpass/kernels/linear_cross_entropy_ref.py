"""Linear cross-entropy (LM head + cross-entropy) without ``N x V`` logits: exact reference and CPU path.

``loss = cross_entropy(hidden @ weight.T + bias, targets)``, the last step of a causal LM's training
forward, written so that the ``[tokens, vocab]`` logits never exist at once (Cut Cross-Entropy, Wijmans
et al. 2024). Three layers here, all plain torch:

- ``linear_cross_entropy_reference``: the materialised definition (logits + ``F.cross_entropy``
  semantics), the oracle the chunked path and the Triton kernels are tested against.
- ``prepare_rows`` / ``scatter_rows`` / ``reduce_rows``: what every path shares: the causal ``shift``
  (row ``t`` predicts ``targets[t + shift]``, HF's ``logits[:, :-1]`` vs ``labels[:, 1:]``), compaction
  of ignored rows (they cost nothing: no logits are computed for them) and the reduction.
- ``chunked_lse_forward`` / ``chunked_backward``: the CPU path over compacted rows, chunked over tokens
  and vocabulary. The forward keeps an online log-sum-exp per row and reads the correct-token logit
  from the same chunk as the LSE (so ``lse - z_target >= 0`` up to rounding, never a negative loss);
  the backward recomputes each chunk, forms ``d = g_nll * (softmax - onehot) + g_lse * softmax`` and
  accumulates ``dE += d @ C``, ``dC += d^T @ E``, ``dbias += sum(d)``, all in fp32.
- ``chunked_forward_backward``: the one-pass variant for scalar losses (loss and unit-gradient
  ``dE, dC, dbias`` together, chunks of whole-vocabulary rows): three matmuls per chunk instead of
  four, the CPU's default for training.

Optional final-logit soft-capping (Gemma 2: ``z = s * tanh(z_raw / s)``) is applied after the bias; its
chain rule is ``dz_raw = dz * (1 - (z / s)^2)``. The returned per-row LSE is differentiable, which is
what a z-loss (``mean(lse^2)``) needs.

Why this path and not torch 2.13's ``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions`` (the same
one-pass idea, chunked over tokens only): measured on this project's 2-core CPU, fp32, forward + backward,
peak RSS growth including the gradients, best of 2, with another benchmark sharing the cores:

| path (D 576, V 49152: SmolLM2's head)           | N 2048            | N 8192 (one run)  |
| eager (logits + ``F.cross_entropy``)              | 4.16 s, 1180 MiB  | 36.2 s, 4636 MiB  |
| torch chunked, default options (16-row chunks)    | 15.1 s,  378 MiB  |                   |
| torch chunked, ``batch_chunk_size=256``           | 4.37 s,  402 MiB  |                   |
| ours, fused (the CPU default for scalar losses)   | 3.81 s,  221 MiB  | 15.2 s,  219 MiB  |
| ours, forward then recomputing backward           | 4.69 s,  206 MiB  |                   |

So the op layer uses this module on the CPU; at 16 MiB chunks (85 rows) the fused path took 5.1 s.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from tokenpass.kernels.cache_attention_ref import soft_cap  # the same cap as attention scores (Gemma 2 logits)

REDUCTIONS = ("none", "sum", "mean")

# Default CPU chunk: tokens x vocabulary fp32 elements per logits chunk (32 MiB). Exponentials are taken
# in place, so one such chunk is alive at a time (two with a soft-cap: its derivative).
CPU_CHUNK_ELEMENTS = 1 << 23
CPU_TOKEN_CHUNK = 1024
FUSED_MIN_ROWS = 128  # see fused_pays_off


class Rows(NamedTuple):
    """The non-ignored rows of a (shifted) batch, compacted: what the loss is computed over."""

    hidden: torch.Tensor  # [R, D], rows of the flattened hidden states (a copy: gathered)
    targets: torch.Tensor  # [R] int64, in [0, V)
    index: torch.Tensor  # [R] int64, position of each row in the flattened batch
    batch_shape: torch.Size  # hidden.shape[:-1] of the caller's tensor


def check_arguments(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    reduction: str,
    shift: int,
) -> None:
    """One-line ``ValueError`` naming the argument at fault, before any work."""
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have a trailing feature axis, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [vocab, features], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has {weight.shape[1]} features but hidden has {hidden.shape[-1]} (shapes "
            f"{tuple(weight.shape)} and {tuple(hidden.shape)})"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must be hidden's without the last axis, "
                         f"{tuple(hidden.shape[:-1])}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32 class indices, got {targets.dtype}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share one floating dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be [{weight.shape[0]}] in {weight.dtype}, got {tuple(bias.shape)} in {bias.dtype}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if shift < 0 or (shift > 0 and hidden.dim() < 2):
        raise ValueError(f"shift must be >= 0 (and needs a sequence axis), got {shift}")


def shifted_targets(targets: torch.Tensor, ignore_index: int, shift: int) -> torch.Tensor:
    """``targets[..., t + shift]`` at row ``t``; the last ``shift`` rows of each sequence get ``ignore_index``."""
    if shift == 0:
        return targets
    tail = targets.new_full((*targets.shape[:-1], min(shift, targets.shape[-1])), ignore_index)
    return torch.cat([targets[..., shift:], tail], dim=-1)


def prepare_rows(
    hidden: torch.Tensor, targets: torch.Tensor, vocab: int, ignore_index: int = -100, shift: int = 0
) -> Rows:
    """Shift, drop ignored rows and check the remaining targets lie in ``[0, vocab)``.

    The range check reads one boolean from the device: an out-of-range target would otherwise be a
    silent wrong loss on the CPU path and an out-of-bounds read in the kernels.
    """
    flat_targets = shifted_targets(targets, ignore_index, shift).reshape(-1).long()
    keep = flat_targets != ignore_index
    if bool(((flat_targets < 0) | (flat_targets >= vocab))[keep].any()):
        bad = flat_targets[keep & ((flat_targets < 0) | (flat_targets >= vocab))][0].item()
        raise ValueError(f"targets must be in [0, {vocab}) or ignore_index={ignore_index}, found {bad}")
    index = keep.nonzero().squeeze(1)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    return Rows(flat_hidden.index_select(0, index), flat_targets.index_select(0, index), index, hidden.shape[:-1])


def scatter_rows(values: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Per-row values back into the batch shape, zero at ignored rows (what ``reduction='none'`` returns)."""
    out = values.new_zeros((math.prod(rows.batch_shape), *values.shape[1:]))
    out.index_copy_(0, rows.index, values)
    return out.view(*rows.batch_shape, *values.shape[1:])


def reduce_rows(nll: torch.Tensor, rows: Rows, reduction: str) -> torch.Tensor:
    """``none``: batch-shaped, 0 at ignored rows; ``sum``; ``mean`` over non-ignored rows (NaN when there are
    none, as ``F.cross_entropy``)."""
    if reduction == "none":
        return scatter_rows(nll, rows)
    total = nll.sum()
    return total if reduction == "sum" else total / nll.shape[0]


def row_loss_grad(grad_loss: torch.Tensor, rows: Rows, reduction: str) -> torch.Tensor:
    """The upstream gradient of each compacted row's nll, ``[R]``, from the reduced loss's gradient."""
    count = rows.index.shape[0]
    acc = accumulation_dtype(grad_loss.dtype)
    if reduction == "none":
        return grad_loss.reshape(-1).index_select(0, rows.index).to(acc)
    scale = grad_loss.to(acc) / (count if reduction == "mean" else 1)
    return scale.expand(count)


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialised definition: ``(loss, lse)`` with logits in ``hidden``'s dtype upcast to fp32.

    ``lse`` is batch-shaped, 0 at ignored rows. Differentiable through plain torch autograd; the oracle
    of every other path (in float64 it is the tests' ground truth).
    """
    check_arguments(hidden, weight, targets, bias, softcap, reduction, shift)
    rows = prepare_rows(hidden, targets, weight.shape[0], ignore_index, shift)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logits = rows.hidden.to(acc) @ weight.to(acc).T
    if bias is not None:
        logits = logits + bias.to(acc)
    logits = soft_cap(logits, softcap)
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits.gather(1, rows.targets[:, None]).squeeze(1)
    return reduce_rows(nll, rows, reduction), scatter_rows(lse, rows)


def chunk_sizes(rows: int, vocab: int, token_chunk: int | None, vocab_chunk: int | None) -> tuple[int, int]:
    """Token and vocabulary chunk lengths so one logits chunk holds about ``CPU_CHUNK_ELEMENTS`` values."""
    tokens = max(1, min(rows, token_chunk or CPU_TOKEN_CHUNK))
    vocabulary = vocab_chunk or max(256, CPU_CHUNK_ELEMENTS // tokens)
    return tokens, max(1, min(vocab, vocabulary))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and narrower inputs (bf16/fp16 matmuls are emulated on the CPU anyway), fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(
    e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int, softcap: float | None
) -> torch.Tensor:
    """Capped logits of rows ``e`` (already in the accumulation dtype) against vocabulary ``[v0, v1)``."""
    c = weight[v0:v1].to(e.dtype)
    z = e @ c.T if bias is None else torch.addmm(bias[v0:v1].to(e.dtype), e, c.T)
    if softcap is not None:
        z = z.div_(softcap).tanh_().mul_(softcap)
    return z


def _target_logit(z: torch.Tensor, targets: torch.Tensor, v0: int) -> torch.Tensor:
    """Each row's target logit if its target lies in this chunk, else 0 (one chunk holds each target)."""
    local = targets - v0
    inside = (local >= 0) & (local < z.shape[1])
    picked = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    return torch.where(inside, picked, torch.zeros_like(picked))


def chunked_lse_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, target_logit)``, ``[R]`` in the accumulation dtype, over compacted rows ``hidden`` ``[R, D]``,
    never holding ``R x V``.

    Online log-sum-exp across vocabulary chunks: running max ``m`` and ``s = sum exp(z - m)``, rescaled
    when the max grows. The target logit comes from the same capped fp32 chunk as the LSE.
    """
    count, vocab = hidden.shape[0], weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    lse = torch.empty(count, dtype=acc, device=hidden.device)
    picked = torch.zeros(count, dtype=acc, device=hidden.device)
    tokens, vocabulary = chunk_sizes(count, vocab, token_chunk, vocab_chunk)
    for r0 in range(0, count, tokens):
        r1 = min(count, r0 + tokens)
        e, t = hidden[r0:r1].to(acc), targets[r0:r1]
        m = torch.full((r1 - r0,), float("-inf"), dtype=acc, device=hidden.device)
        s = torch.zeros(r1 - r0, dtype=acc, device=hidden.device)
        for v0 in range(0, vocab, vocabulary):
            v1 = min(vocab, v0 + vocabulary)
            z = _chunk_logits(e, weight, bias, v0, v1, softcap)
            picked[r0:r1] += _target_logit(z, t, v0)
            m_new = torch.maximum(m, z.amax(1))
            s = s * torch.exp(m - m_new) + z.sub_(m_new[:, None]).exp_().sum(1)  # in place: one chunk alive
            m = m_new
        lse[r0:r1] = m + torch.log(s)
    return lse, picked


def chunked_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_nll: torch.Tensor,
    grad_lse: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    filter_eps: float | None = None,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dE [R, D], dC [V, D], dbias [V] or None)`` in the accumulation dtype by recomputing each chunk's logits.

    ``d = (g_nll + g_lse) * softmax - g_nll * onehot``. With ``filter_eps`` a chunk whose
    ``|softmax - onehot|`` is below it everywhere is skipped (its contribution is under the dtype's
    precision); on the CPU chunks are large, so this rarely fires: it is here for parity with the kernels.
    """
    count, vocab = hidden.shape[0], weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    d_hidden = torch.zeros(count, hidden.shape[1], dtype=acc, device=hidden.device)
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    d_bias = None if bias is None else torch.zeros(vocab, dtype=acc, device=weight.device)
    tokens, vocabulary = chunk_sizes(count, vocab, token_chunk, vocab_chunk)
    for r0 in range(0, count, tokens):
        r1 = min(count, r0 + tokens)
        e, t = hidden[r0:r1].to(acc), targets[r0:r1]
        g = grad_nll[r0:r1].to(acc)[:, None]
        g_total = g if grad_lse is None else g + grad_lse[r0:r1].to(acc)[:, None]
        for v0 in range(0, vocab, vocabulary):
            v1 = min(vocab, v0 + vocabulary)
            z = _chunk_logits(e, weight, bias, v0, v1, softcap)
            cap_grad = None if softcap is None else _cap_derivative(z, softcap)
            d = z.sub_(lse[r0:r1, None]).exp_()  # in place: z is not needed past the cap's derivative
            local = t - v0
            hit = ((local >= 0) & (local < v1 - v0)).nonzero().squeeze(1)
            if filter_eps is not None and _chunk_is_filtered(d, hit, filter_eps):
                continue
            d.mul_(g_total)
            d.index_put_((hit, local[hit]), -g[hit, 0], accumulate=True)
            if cap_grad is not None:
                d.mul_(cap_grad)
            c = weight[v0:v1].to(acc)
            d_hidden[r0:r1].addmm_(d, c)
            d_weight[v0:v1].addmm_(d.T, e)
            if d_bias is not None:
                d_bias[v0:v1] += d.sum(0)
    return d_hidden, d_weight, d_bias


def fused_pays_off(vocab: int) -> bool:
    """Whether ``chunked_forward_backward`` beats the recomputing path for this vocabulary on the CPU.

    Each of its chunks rewrites all of ``dC`` (a rank-``rows`` update), so with few rows per chunk that
    memory traffic costs more than the matmul it saves: it needs ``FUSED_MIN_ROWS`` rows of the whole
    vocabulary within ``CPU_CHUNK_ELEMENTS`` (SmolLM2's 49152 fits; Gemma's 256000 does not).
    """
    return CPU_CHUNK_ELEMENTS // max(vocab, 1) >= FUSED_MIN_ROWS


def fused_token_chunk(rows: int, vocab: int, token_chunk: int | None = None) -> int:
    """Rows per chunk of ``chunked_forward_backward``: its ``[rows, V]`` logits hold ``CPU_CHUNK_ELEMENTS``."""
    return max(1, min(rows, token_chunk or max(16, CPU_CHUNK_ELEMENTS // max(vocab, 1))))


def chunked_forward_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    token_chunk: int | None = None,
    scatter_index: torch.Tensor | None = None,
    scatter_rows_total: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(lse, target_logit, dE, dC, dbias)`` for a unit gradient on every row's nll, in one pass.

    Why: a scalar loss's backward only scales these by ``grad / count``, so computing them while the
    logits are at hand costs three matmuls per chunk (logits, ``d @ C``, ``d^T @ E``) instead of the
    forward-then-recompute path's four. Chunks span the whole vocabulary (the LSE must be final before
    ``softmax - onehot``), so they are only ``token_chunk`` rows tall; each chunk also rewrites all of
    ``dC``, which is why this wins on the CPU (memory traffic is cheap next to a saved matmul) and is not
    the GPU's design.

    With ``scatter_index`` (the compacted rows' positions, ``Rows.index``) ``dE`` is returned already
    scattered into ``[scatter_rows_total, D]`` (zeros at ignored rows), chunk by chunk: no second
    ``[R, D]`` buffer beside the batch-shaped one.
    """
    count, vocab = hidden.shape[0], weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    lse = torch.empty(count, dtype=acc, device=hidden.device)
    picked = torch.empty(count, dtype=acc, device=hidden.device)
    scatter = scatter_index is not None
    d_hidden = torch.zeros(scatter_rows_total, hidden.shape[1], dtype=acc, device=hidden.device) if scatter \
        else torch.empty(count, hidden.shape[1], dtype=acc, device=hidden.device)
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    d_bias = None if bias is None else torch.zeros(vocab, dtype=acc, device=weight.device)
    pieces = _weight_pieces(vocab, weight.dtype == acc)
    tokens = fused_token_chunk(count, vocab, token_chunk)
    for r0 in range(0, count, tokens):
        r1 = min(count, r0 + tokens)
        e, t = hidden[r0:r1].to(acc), targets[r0:r1]
        z = _chunk_logits(e, weight, bias, 0, vocab, softcap) if len(pieces) == 1 else _logits_by_pieces(
            e, weight, bias, pieces, softcap)
        picked[r0:r1] = z.gather(1, t[:, None]).squeeze(1)
        cap_grad = None if softcap is None else _cap_derivative(z, softcap)
        m = z.amax(1, keepdim=True)
        p = z.sub_(m).exp_()  # in place: the chunk is the only [rows, V] tensor alive (two with a cap)
        total = p.sum(1, keepdim=True)
        lse[r0:r1] = (m + total.log()).squeeze(1)
        d = p.div_(total)
        d[torch.arange(r1 - r0, device=d.device), t] -= 1
        if cap_grad is not None:
            d.mul_(cap_grad)
        d_e = torch.zeros(r1 - r0, hidden.shape[1], dtype=acc, device=hidden.device)
        for v0, v1 in pieces:
            c = weight[v0:v1].to(acc)
            d_e.addmm_(d[:, v0:v1], c)
            d_weight[v0:v1].addmm_(d[:, v0:v1].T, e)
        if d_bias is not None:
            d_bias += d.sum(0)
        if scatter:
            d_hidden.index_copy_(0, scatter_index[r0:r1], d_e)
        else:
            d_hidden[r0:r1] = d_e
    return lse, picked, d_hidden, d_weight, d_bias


def _logits_by_pieces(e, weight, bias, pieces, softcap) -> torch.Tensor:
    """Full-vocabulary logits of rows ``e`` filled piece by piece (only one converted weight piece alive)."""
    z = torch.empty(e.shape[0], weight.shape[0], dtype=e.dtype, device=e.device)
    for v0, v1 in pieces:
        z[:, v0:v1] = _chunk_logits(e, weight, bias, v0, v1, softcap)
    return z


def _weight_pieces(vocab: int, same_dtype: bool) -> list[tuple[int, int]]:
    """Vocabulary ranges the weight is read in: all at once when it is already in the accumulation dtype,
    else pieces converted one at a time (a bf16 head is never copied whole to fp32)."""
    step = vocab if same_dtype else max(1, CPU_CHUNK_ELEMENTS // 1024)
    return [(v0, min(vocab, v0 + step)) for v0 in range(0, vocab, step)]


def _cap_derivative(capped: torch.Tensor, softcap: float) -> torch.Tensor:
    """``d capped / d raw = 1 - (capped / softcap)^2`` (the derivative of ``s * tanh(x / s)``)."""
    return (capped / softcap).square_().neg_().add_(1)


def _chunk_is_filtered(p: torch.Tensor, hit: torch.Tensor, eps: float) -> bool:
    """True when every ``|softmax - onehot|`` of the chunk is below ``eps``: no target falls in it (a
    target's entry ``1 - p`` is >= eps whenever all ``p < eps``) and every probability is below ``eps``."""
    return hit.numel() == 0 and not bool((p >= eps).any())


def resolve_filter_eps(filter_eps: float | str | None, dtype: torch.dtype) -> float | None:
    """``"auto"``: ``finfo(dtype).eps / 32`` (below what the gradient's dtype can hold); None: exact."""
    if filter_eps is None:
        return None
    if filter_eps == "auto":
        return torch.finfo(dtype).eps / 32
    if isinstance(filter_eps, str) or not filter_eps >= 0:
        raise ValueError(f"filter_eps must be 'auto', None or a number >= 0, got {filter_eps!r}")
    return float(filter_eps)


def vocab_order(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Vocabulary indices by decreasing mean (uncapped) logit over the rows: one matrix-vector product,
    since the mean of ``E @ C.T`` over rows is ``mean(E) @ C.T``."""
    mean_logit = weight.float() @ hidden.float().mean(0)
    if bias is not None:
        mean_logit += bias.float()
    return torch.argsort(mean_logit, descending=True)
