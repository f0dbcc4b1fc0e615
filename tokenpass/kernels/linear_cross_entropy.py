"""Linear cross-entropy in Triton: logits tiles live on chip only (Cut Cross-Entropy's forward and backward).

Both kernels work on compacted rows (ignored rows are dropped before, ``linear_cross_entropy_ref.
prepare_rows``) and have the CPU path's signatures (``chunked_lse_forward``, ``chunked_backward``), which
are their exact references; tests run them under ``TRITON_INTERPRET=1`` on small shapes.

- Forward: one program per (row block, vocabulary split) computes ``[BLOCK_B, BLOCK_V]`` logits tiles
  (fp32 accumulation over ``D`` blocks), adds the bias, soft-caps, and only then masks padding lanes to
  ``-inf`` (``s * tanh(-inf)`` is the finite ``-s``: masking before the cap would let padding lanes into
  the sum). It keeps an online max/sum per row and picks the correct-token logit from the same tiles, so
  ``lse - z_target`` cannot go negative from two differently rounded logits. Per-split partials are merged
  in torch (``[splits, R]``, tiny).
- Backward: one program per (row block, vocabulary block) recomputes its tile, forms
  ``softmax - onehot``, skips the tile when every entry is below ``filter_eps`` (the gradient would be
  under the dtype's precision; "auto" is ``finfo(dtype).eps / 32``), scales by the upstream gradients
  (``g_nll`` and, for a z-loss, ``g_lse``), applies the cap's derivative and atomically accumulates
  ``dE += d @ C``, ``dC += d^T @ E`` and ``dbias += sum(d)`` in fp32. With ``sort_vocab`` the vocabulary
  is visited in order of mean logit, so entries that are negligible for every row share tiles and more
  tiles are skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenpass.kernels.linear_cross_entropy_ref import vocab_order


@triton.jit
def _capped(z, softcap):
    """``softcap * tanh(z / softcap)`` via ``2 * sigmoid(2x) - 1`` (portable: the interpreter has no tanh)."""
    return softcap * (2.0 * tl.sigmoid(z * (2.0 / softcap)) - 1.0)


@triton.jit
def _logits_tile(
    E, C, BIAS, offs_b, offs_v, b_mask, v_mask, features, stride_eb, stride_ed, stride_cv, stride_cd,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """fp32 ``E[offs_b] @ C[offs_v].T (+ bias)`` for one tile; padding lanes read zeros (masked later)."""
    acc = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, features, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < features
        e = tl.load(E + offs_b[:, None] * stride_eb + d[None, :] * stride_ed, mask=b_mask[:, None] & d_mask[None, :],
                    other=0.0)
        c = tl.load(C + offs_v[None, :] * stride_cv + d[:, None] * stride_cd, mask=v_mask[None, :] & d_mask[:, None],
                    other=0.0)
        if IEEE:
            acc = tl.dot(e, c, acc, input_precision="ieee")
        else:
            acc = tl.dot(e, c, acc)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _lse_forward_kernel(
    E, C, BIAS, TARGETS, M_OUT, S_OUT, Z_OUT,
    rows, vocab, features, chunk, softcap,
    stride_eb, stride_ed, stride_cv, stride_cd,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    b_mask = offs_b < rows
    targets = tl.load(TARGETS + offs_b, mask=b_mask, other=-1)
    m_i = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_B,), tl.float32)
    z_i = tl.zeros((BLOCK_B,), tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, vocab)
    for v0 in range(start, end, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < end
        z = _logits_tile(E, C, BIAS, offs_b, offs_v, b_mask, v_mask, features, stride_eb, stride_ed, stride_cv,
                         stride_cd, HAS_BIAS, IEEE, BLOCK_B, BLOCK_V, BLOCK_D)
        if SOFTCAP:
            z = _capped(z, softcap)
        z = tl.where(v_mask[None, :], z, float("-inf"))  # after the cap: tanh(-inf) * s is finite
        z_i += tl.sum(tl.where((targets[:, None] == offs_v[None, :]) & v_mask[None, :], z, 0.0), 1)
        m_new = tl.maximum(m_i, tl.max(z, 1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m_i = m_new
    out = split * rows + offs_b
    tl.store(M_OUT + out, m_i, mask=b_mask)
    tl.store(S_OUT + out, s_i, mask=b_mask)
    tl.store(Z_OUT + out, z_i, mask=b_mask)


@triton.jit
def _backward_kernel(
    E, C, BIAS, TARGETS, LSE, G_NLL, G_LSE, ORDER, D_E, D_C, D_BIAS,
    rows, vocab, features, softcap, filter_eps,
    stride_eb, stride_ed, stride_cv, stride_cd,
    HAS_BIAS: tl.constexpr, HAS_G_LSE: tl.constexpr, HAS_ORDER: tl.constexpr, SOFTCAP: tl.constexpr,
    FILTER: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_B: tl.constexpr,
):
    # Grouped launch order: GROUP_B row blocks sweep the vocabulary together, so C tiles are reused in L2.
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(rows, BLOCK_B)
    vocab_blocks = tl.cdiv(vocab, BLOCK_V)
    per_group = GROUP_B * vocab_blocks
    first_b = (pid // per_group) * GROUP_B
    group_size = tl.minimum(row_blocks - first_b, GROUP_B)
    pid_b = first_b + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    b_mask = offs_b < rows
    slots = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    v_mask = slots < vocab
    if HAS_ORDER:
        offs_v = tl.load(ORDER + slots, mask=v_mask, other=0).to(tl.int64)
    else:
        offs_v = slots
    z = _logits_tile(E, C, BIAS, offs_b, offs_v, b_mask, v_mask, features, stride_eb, stride_ed, stride_cv, stride_cd,
                     HAS_BIAS, IEEE, BLOCK_B, BLOCK_V, BLOCK_D)
    if SOFTCAP:
        z = _capped(z, softcap)
    lse = tl.load(LSE + offs_b, mask=b_mask, other=float("inf"))
    live = b_mask[:, None] & v_mask[None, :]
    p = tl.where(live, tl.exp(z - lse[:, None]), 0.0)  # after the cap: padding lanes hold a finite z
    targets = tl.load(TARGETS + offs_b, mask=b_mask, other=-1)
    is_target = (targets[:, None] == offs_v[None, :]) & live
    keep = True
    if FILTER:
        keep = tl.max(tl.max(tl.abs(p - tl.where(is_target, 1.0, 0.0)), 1), 0) >= filter_eps
    if keep:
        g = tl.load(G_NLL + offs_b, mask=b_mask, other=0.0)
        g_total = g
        if HAS_G_LSE:
            g_total = g + tl.load(G_LSE + offs_b, mask=b_mask, other=0.0)
        d = p * g_total[:, None] - tl.where(is_target, g[:, None], 0.0)
        if SOFTCAP:
            capped = z / softcap
            d = d * (1.0 - capped * capped)
        if HAS_BIAS:
            tl.atomic_add(D_BIAS + offs_v, tl.sum(d, 0), mask=v_mask)
        d_low = d.to(E.dtype.element_ty)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, features, BLOCK_D):
            dd = d0 + offs_d
            d_mask = dd < features
            c = tl.load(C + offs_v[:, None] * stride_cv + dd[None, :] * stride_cd,
                        mask=v_mask[:, None] & d_mask[None, :], other=0.0)
            e = tl.load(E + offs_b[:, None] * stride_eb + dd[None, :] * stride_ed,
                        mask=b_mask[:, None] & d_mask[None, :], other=0.0)
            if IEEE:
                de = tl.dot(d_low, c, input_precision="ieee")
                dc = tl.dot(tl.trans(d_low), e, input_precision="ieee")
            else:
                de = tl.dot(d_low, c)
                dc = tl.dot(tl.trans(d_low), e)
            tl.atomic_add(D_E + offs_b[:, None] * features + dd[None, :], de, mask=b_mask[:, None] & d_mask[None, :])
            tl.atomic_add(D_C + offs_v[:, None] * features + dd[None, :], dc, mask=v_mask[:, None] & d_mask[None, :])


def _block_d(features: int, block_d: int | None) -> int:
    return block_d or min(64, max(16, triton.next_power_of_2(features)))


def _num_splits(row_blocks: int, vocab: int, block_v: int, device: torch.device) -> int:
    """Enough vocabulary splits to fill the GPU when there are few row blocks; 2 on the CPU (tests the merge)."""
    if device.type != "cuda":
        return max(1, min(2, triton.cdiv(vocab, block_v)))
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(target, row_blocks), triton.cdiv(vocab, block_v)))


def lse_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    block_b: int = 64,
    block_v: int = 128,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, target_logit)`` fp32 ``[R]`` over compacted rows ``hidden`` ``[R, D]`` (any strides)."""
    rows, features = hidden.shape
    vocab = weight.shape[0]
    row_blocks = triton.cdiv(rows, block_b)
    splits = _num_splits(row_blocks, vocab, block_v, hidden.device)
    chunk = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    splits = triton.cdiv(vocab, chunk)  # every split non-empty
    m, s, z = (torch.empty((splits, rows), dtype=torch.float32, device=hidden.device) for _ in range(3))
    if rows == 0:
        return m.sum(0), z.sum(0)
    _lse_forward_kernel[(row_blocks, splits)](
        hidden, weight, bias if bias is not None else weight, targets, m, s, z,
        rows, vocab, features, chunk, float(softcap or 1.0),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, IEEE=hidden.dtype == torch.float32,
        BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_D=_block_d(features, block_d),
    )
    m_max = m.amax(0)
    lse = m_max + torch.log((s * torch.exp(m - m_max)).sum(0))
    return lse, z.sum(0)


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_nll: torch.Tensor,
    grad_lse: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    filter_eps: float | None = None,
    sort_vocab: bool = True,
    block_b: int = 64,
    block_v: int = 64,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """fp32 ``(dE [R, D], dC [V, D], dbias [V] or None)``; see the module docstring."""
    rows, features = hidden.shape
    vocab = weight.shape[0]
    d_hidden = torch.zeros((rows, features), dtype=torch.float32, device=hidden.device)
    d_weight = torch.zeros((vocab, features), dtype=torch.float32, device=weight.device)
    d_bias = None if bias is None else torch.zeros(vocab, dtype=torch.float32, device=weight.device)
    if rows == 0:
        return d_hidden, d_weight, d_bias
    order = vocab_order(hidden, weight, bias) if sort_vocab else None
    grid = (triton.cdiv(rows, block_b) * triton.cdiv(vocab, block_v),)
    _backward_kernel[grid](
        hidden, weight, bias if bias is not None else weight, targets, lse.float().contiguous(),
        grad_nll.float().contiguous(), grad_lse.float().contiguous() if grad_lse is not None else lse,
        order if order is not None else targets, d_hidden, d_weight, d_bias if d_bias is not None else d_weight,
        rows, vocab, features, float(softcap or 1.0), float(filter_eps or 0.0),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, HAS_G_LSE=grad_lse is not None, HAS_ORDER=order is not None,
        SOFTCAP=softcap is not None, FILTER=filter_eps is not None, IEEE=hidden.dtype == torch.float32,
        BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_D=_block_d(features, block_d), GROUP_B=8,
    )
    return d_hidden, d_weight, d_bias
