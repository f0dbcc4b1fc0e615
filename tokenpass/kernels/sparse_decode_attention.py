"""Sparse decode attention over gathered cache slots: a Triton kernel, GQA aware.

One program per (sequence, query head) walks that head's selected slots (its own, or its KV head's when
selection is shared per KV head), loads the keys and values at those slots straight from the cache
buffer (no gathered copy), and runs an online softmax; the step's own slot is always attended. Scores
can be soft-capped (Gemma 2); a sliding window arrives folded into ``valid``. The exact torch reference
is ``tokenpass.kernels.sparse_attention_ref.sparse_attention_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenpass.kernels.cache_attention_ref import check_softcap
from tokenpass.kernels.decode_attention import capped


@triton.jit
def _sparse_decode_kernel(
    Q, K, V, VALID, SLOTS, OUT,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_valid_b, stride_valid_h, stride_valid_s,
    stride_sb, stride_sh, stride_sk,
    stride_ob, stride_oh, stride_od,
    num_selected, current_slot, head_dim, group, slot_group, scale, softcap,
    NUM_HEADS: tl.constexpr, HAS_VALID: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // NUM_HEADS
    hq = pid % NUM_HEADS
    hkv = hq // group
    hs = hq // slot_group  # row of SLOTS: the query head itself, or its KV head
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < head_dim
    q = tl.load(Q + b * stride_qb + hq * stride_qh + offs_d * stride_qd, mask=d_mask, other=0.0).to(tl.float32)

    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    total = num_selected + 1  # the selected slots, then the step's own slot
    for n0 in range(0, total, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < total
        picked = tl.load(SLOTS + b * stride_sb + hs * stride_sh + n * stride_sk, mask=n < num_selected, other=0)
        slot = tl.where(n < num_selected, picked, current_slot)
        k = tl.load(K + b * stride_kb + hkv * stride_kh + slot[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], 1) * scale
        if SOFTCAP:  # before masking, so dead slots stay at -inf
            s = capped(s, softcap)
        keep = n_mask
        if HAS_VALID:
            live = tl.load(VALID + b * stride_valid_b + hkv * stride_valid_h + slot * stride_valid_s, mask=n_mask, other=0)
            keep = keep & ((live != 0) | (n >= num_selected))
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with every slot dead
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        l_i = l_i * alpha + tl.sum(p, 0)
        v = tl.load(V + b * stride_vb + hkv * stride_vh + slot[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    tl.store(OUT + b * stride_ob + hq * stride_oh + offs_d * stride_od, acc / l_i, mask=d_mask)


def sparse_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    slots: torch.Tensor,
    scale: float,
    block_n: int = 64,
    softcap: float | None = None,
) -> torch.Tensor:
    """``[B, Hq, 1, D]`` queries over their ``slots`` ``[B, Hsel, k]`` of ``[B, Hkv, S, D]`` cache slots.

    The last slot (the step's own token) is always attended; ``Hsel`` is ``Hq`` or ``Hkv``. ``softcap``
    caps the scaled scores before masking and softmax.
    """
    check_softcap(softcap)
    batch, heads, _, head_dim = query.shape
    kv_heads, total_slots = keys.shape[1], keys.shape[2]
    out = torch.empty((batch, heads, head_dim), dtype=torch.float32, device=query.device)
    has_valid = valid is not None
    valid_arg = valid.to(torch.int8) if has_valid else out
    valid_strides = valid_arg.stride() if has_valid else (0, 0, 0)
    q = query[:, :, 0]
    _sparse_decode_kernel[(batch * heads,)](
        q, keys, values, valid_arg, slots, out,
        *q.stride(), *keys.stride(), *values.stride(), *valid_strides, *slots.stride(), *out.stride(),
        slots.shape[-1], total_slots - 1, head_dim, heads // kv_heads, heads // slots.shape[1], scale,
        float(softcap or 1.0),
        NUM_HEADS=heads, HAS_VALID=has_valid, SOFTCAP=softcap is not None, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )
    return out[:, :, None].to(query.dtype)
