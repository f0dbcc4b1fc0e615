"""TokenSelect's soft vote as a Triton kernel: one pass over the keys, no values, no output.

One program handles one (sequence, KV head) pair and one chunk of slots for every query head of the
group, so each key block is read once per group. It writes the scaled (optionally soft-capped) scores
of the candidates and, per query head, the chunk's running (max, sum of exp); the softmax normaliser
of each head is merged from the chunks afterwards and the vote ``sum_h exp(s_h - lse_h)`` is a pass over
the scores, which are a few bytes per slot against a key row's ``2 * head_dim``. The exact torch
reference is ``tokenpass.kernels.token_select_ref.soft_vote``; tests run this kernel under
``TRITON_INTERPRET=1`` on CPU against it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenpass.kernels.decode_attention import _num_splits, capped, query_group


@triton.jit
def _vote_scores_kernel(
    Q, K, CAND, M_OUT, L_OUT, SCORES,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_cb, stride_cs,
    slots, group, head_dim, chunk, scale, softcap, splits,
    NUM_KV_HEADS: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, h, split, offs_g, offs_d, offs_n, g_mask, d_mask, q = query_group(
        Q, stride_qb, stride_qh, stride_qd, group, head_dim, NUM_KV_HEADS, BLOCK_G, BLOCK_N, BLOCK_D)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, slots)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < end
        k = tl.load(K + b * stride_kb + h * stride_kh + n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee") * scale
        else:
            s = tl.dot(q, k) * scale
        if SOFTCAP:
            s = capped(s, softcap)
        candidate = tl.load(CAND + b * stride_cb + n * stride_cs, mask=n_mask, other=0) != 0
        s = tl.where((n_mask & candidate)[None, :], s, float("-inf"))
        tl.store(SCORES + ((b * NUM_KV_HEADS + h) * group + offs_g)[:, None] * slots + n[None, :], s,
                 mask=g_mask[:, None] & n_mask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    base = ((b * NUM_KV_HEADS + h) * splits + split) * group + offs_g
    tl.store(M_OUT + base, m_i, mask=g_mask)
    tl.store(L_OUT + base, l_i, mask=g_mask)


def soft_vote_kernel(query: torch.Tensor, keys: torch.Tensor, candidates: torch.Tensor, scale: float,
                     softcap: float | None = None, block_n: int = 64) -> torch.Tensor:
    """``soft_vote`` (same arguments, same ``[B, S]`` result) with the scores from one pass over K."""
    batch, heads, _, head_dim = query.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    splits = _num_splits(batch * kv_heads, slots, block_n, query.device)
    chunk = triton.cdiv(triton.cdiv(slots, splits), block_n) * block_n
    splits = triton.cdiv(slots, chunk)
    m = torch.empty((batch, kv_heads, splits, group), dtype=torch.float32, device=query.device)
    l = torch.empty_like(m)
    scores = torch.empty((batch, kv_heads, group, slots), dtype=torch.float32, device=query.device)
    cand = candidates.to(torch.int8)
    q = query[:, :, 0]
    _vote_scores_kernel[(batch * kv_heads, splits)](
        q, keys, cand, m, l, scores,
        *q.stride(), *keys.stride(), *cand.stride(),
        slots, group, head_dim, chunk, scale, float(softcap or 1.0), splits,
        NUM_KV_HEADS=kv_heads, IEEE=query.dtype == torch.float32, SOFTCAP=softcap is not None,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )
    m_max = m.amax(2, keepdim=True)
    m_safe = torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max)
    lse = (m_safe + (l * torch.exp(m - m_safe)).sum(2, keepdim=True).log())[:, :, 0]  # [B, Hkv, G]
    votes = torch.exp(scores - lse[..., None]).nan_to_num_(0.0)  # a head without candidates votes nothing
    return votes.sum((1, 2))
