"""Dense decode attention over the runtime KV cache: a split-K (flash-decoding) Triton kernel, GQA aware.

One program handles one (sequence, KV head) pair and one chunk of the cache for *all* query heads of
that KV head's group, so each key/value block is read once per group rather than once per query head.
Chunks give the GPU enough programs at batch 1; their partial (max, sum, output) triples are merged
afterwards with the usual log-sum-exp rescaling. Scores can be soft-capped (Gemma 2's
``softcap * tanh(s / softcap)``); a sliding window reaches the kernel folded into ``valid``
(``cache_attention_ref.window_valid``). The exact torch reference is
``tokenpass.kernels.cache_attention_ref.cache_attention_reference``; tests run this kernel under
``TRITON_INTERPRET=1`` on CPU against it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenpass.kernels.cache_attention_ref import check_softcap


@triton.jit
def capped(s, softcap):
    """``softcap * tanh(s / softcap)``, with ``tanh(x) = 2 * sigmoid(2x) - 1``: ``tl`` has no portable tanh
    (libdevice is CUDA-only, and the interpreter needs plain ``tl`` ops)."""
    return softcap * (2.0 * tl.sigmoid(s * (2.0 / softcap)) - 1.0)


@triton.jit
def query_group(Q, stride_qb, stride_qh, stride_qd, group, head_dim, NUM_KV_HEADS: tl.constexpr,
                BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """What every decode kernel's program starts from: its (sequence, KV head, chunk of slots), the
    offsets and masks of the group's query heads, and those heads' queries ``[BLOCK_G, BLOCK_D]``."""
    pid = tl.program_id(0)
    b = pid // NUM_KV_HEADS
    h = pid % NUM_KV_HEADS
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < group
    d_mask = offs_d < head_dim
    q_ptrs = Q + b * stride_qb + (h * group + offs_g)[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    return b, h, tl.program_id(1), offs_g, offs_d, offs_n, g_mask, d_mask, q


@triton.jit
def _decode_split_kernel(
    Q, K, V, VALID, M_OUT, L_OUT, O_OUT, SCORES,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_mh, stride_ms, stride_mg,
    stride_valid_b, stride_valid_h, stride_valid_s,
    slots, group, head_dim, chunk, scale, softcap,
    NUM_KV_HEADS: tl.constexpr, HAS_VALID: tl.constexpr, IEEE: tl.constexpr, WRITE_SCORES: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, h, split, offs_g, offs_d, offs_n, g_mask, d_mask, q = query_group(
        Q, stride_qb, stride_qh, stride_qd, group, head_dim, NUM_KV_HEADS, BLOCK_G, BLOCK_N, BLOCK_D)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, slots)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < end
        k_ptrs = K + b * stride_kb + h * stride_kh + n[None, :] * stride_ks + offs_d[:, None] * stride_kd
        k = tl.load(k_ptrs, mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee") * scale
        else:
            s = tl.dot(q, k) * scale
        if SOFTCAP:  # before masking, so dead slots stay at -inf
            s = capped(s, softcap)
        keep = n_mask
        if HAS_VALID:
            live = tl.load(VALID + b * stride_valid_b + h * stride_valid_h + n * stride_valid_s, mask=n_mask, other=0)
            keep = keep & (live != 0)
        s = tl.where(keep[None, :], s, float("-inf"))
        if WRITE_SCORES:  # [B, Hkv, G, S] scores for a top-k that runs after the kernel
            s_ptrs = SCORES + ((b * NUM_KV_HEADS + h) * group + offs_g)[:, None] * slots + n[None, :]
            tl.store(s_ptrs, s, mask=g_mask[:, None] & n_mask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = V + b * stride_vb + h * stride_vh + n[:, None] * stride_vs + offs_d[None, :] * stride_vd
        v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    base = b * stride_mb + h * stride_mh + split * stride_ms + offs_g * stride_mg
    tl.store(M_OUT + base, m_i, mask=g_mask)
    tl.store(L_OUT + base, l_i, mask=g_mask)
    o_ptrs = O_OUT + (base * BLOCK_D)[:, None] + offs_d[None, :]
    tl.store(o_ptrs, acc, mask=g_mask[:, None] & d_mask[None, :])


def merge_splits(m: torch.Tensor, l: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Combine per-chunk ``(max, sum, unnormalised output)`` over the split axis 2."""
    m_max = m.amax(2, keepdim=True)
    weight = torch.exp(m - torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max))
    numerator = (weight[..., None] * o).sum(2)
    return numerator / (weight * l).sum(2)[..., None]


def _num_splits(programs: int, slots: int, block_n: int, device: torch.device) -> int:
    if device.type != "cuda":
        return max(1, min(4, triton.cdiv(slots, block_n)))  # small, but exercises the merge in tests
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(slots, block_n)))


def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scale: float,
    block_n: int = 64,
    return_scores: bool = False,
    softcap: float | None = None,
):
    """One query token per sequence ``[B, Hq, 1, D]`` over cache slots ``[B, Hkv, S, D]`` (any strides).

    ``return_scores`` also returns the scaled scores ``[B, Hkv, G, S]`` (dead slots at ``-inf``), written
    in the same pass over the keys: what a selection layer's top-k needs. ``softcap`` caps the scaled
    scores before masking and softmax; the returned scores are then the capped ones, which is what a
    per-KV-head vote over probabilities needs.
    """
    check_softcap(softcap)
    batch, heads, steps, head_dim = query.shape
    if steps != 1:
        raise ValueError(f"decode_attention takes one query token per sequence, got {steps}")
    kv_heads, slots = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    block_g = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(head_dim))
    splits = _num_splits(batch * kv_heads, slots, block_n, query.device)
    chunk = triton.cdiv(triton.cdiv(slots, splits), block_n) * block_n
    splits = triton.cdiv(slots, chunk)
    m = torch.empty((batch, kv_heads, splits, block_g), dtype=torch.float32, device=query.device)
    l = torch.empty_like(m)
    o = torch.empty((batch, kv_heads, splits, block_g, block_d), dtype=torch.float32, device=query.device)
    has_valid = valid is not None
    valid_arg = valid.to(torch.int8) if has_valid else m
    valid_strides = valid_arg.stride() if has_valid else (0, 0, 0)
    q = query[:, :, 0]
    scores = torch.empty((batch, kv_heads, group, slots) if return_scores else (1,), dtype=torch.float32,
                         device=query.device)
    _decode_split_kernel[(batch * kv_heads, splits)](
        q, keys, values, valid_arg, m, l, o, scores,
        *q.stride(), *keys.stride(), *values.stride(), *m.stride(), *valid_strides,
        slots, group, head_dim, chunk, scale, float(softcap or 1.0),
        NUM_KV_HEADS=kv_heads, HAS_VALID=has_valid, IEEE=query.dtype == torch.float32, WRITE_SCORES=return_scores,
        SOFTCAP=softcap is not None,
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    out = merge_splits(m[..., :group], l[..., :group], o[..., :group, :head_dim])  # [B, Hkv, G, D]
    out = out.reshape(batch, heads, 1, head_dim).to(query.dtype)
    return (out, scores) if return_scores else out

