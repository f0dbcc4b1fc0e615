"""Attention-logit soft-capping and sliding windows in the cache-attention references and Triton kernels.

The references are checked against naive formulas written out here (visibility decided slot by slot in
Python loops, fp64 scores and softmax); the kernels (interpreter on CPU) against the references; and
calls without the new arguments against frozen copies of the implementations that predate them.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokenpass.kernels.attention_ref import expand_kv_heads
from tokenpass.kernels.cache_attention_ref import cache_attention_reference, window_valid
from tokenpass.kernels.sparse_attention_ref import (
    _row_index,
    cache_rows,
    decode_scores,
    ranking_scores,
    selection_attention_reference,
    sparse_attention_reference,
    top_slots,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


# ---------------------------------------------------------------- naive formulas


def naive_visible(valid, slot_positions, query_positions, window, new_tokens: int, slots: int, kv_heads: int):
    """``[B, Hkv, T, S]`` bool, slot by slot: causal, live and in the window, or the query's own slot."""
    batch = query_positions.shape[0] if query_positions is not None else valid.shape[0] if valid is not None else 1
    visible = torch.zeros(batch, kv_heads, new_tokens, slots, dtype=torch.bool)
    for b in range(batch):
        for h in range(kv_heads):
            for i in range(new_tokens):
                own = slots - new_tokens + i
                for j in range(slots):
                    ok = j <= own and (valid is None or bool(valid[b, h, j]))
                    if window is not None:
                        ok = ok and int(query_positions[b, i]) - int(slot_positions[b, h, j]) < window
                    visible[b, h, i, j] = ok or j == own
    return visible


def naive_scores(query, keys, scale: float, softcap):
    """``[B, Hq, T, S]`` fp64 scores, query head ``h`` reading KV head ``h // group``, capped if asked."""
    group = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    scores = torch.matmul(query.double(), k.transpose(-1, -2)) * scale
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def naive_attention(query, keys, values, visible, scale: float, softcap):
    """Masked softmax written out in fp64; ``visible`` is ``[B, Hkv, T, S]`` (each KV head's group shares it)."""
    group = query.shape[1] // keys.shape[1]
    scores = naive_scores(query, keys, scale, softcap)
    scores = scores.masked_fill(~visible.repeat_interleave(group, dim=1), -math.inf)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.matmul(weights, values.double().repeat_interleave(group, dim=1))


# ---------------------------------------------------------------- inputs


def cache_inputs(dtype, new_tokens: int, past: int, per_head: bool, seed: int = 0, batch: int = 2):
    """A GQA step (Hq=4, Hkv=2) over ``past + new_tokens`` slots.

    Row 0 is left-padded by 3 slots; when the step starts the sequence those are padding queries whose own
    slot is dead, so only the own-slot rule keeps their rows finite. ``per_head`` gives KV head 1 of row 1
    its own layout, as per-head eviction with slot reuse leaves it: past positions out of slot order, and
    two dead slots.

    Queries are scaled up so raw scores reach well past the caps the tests use.
    """
    g = torch.Generator().manual_seed(seed)
    slots = past + new_tokens
    q = 3 * torch.randn(batch, 4, new_tokens, 16, generator=g)
    k = torch.randn(batch, 2, slots + 3, 16, generator=g)[:, :, :slots]  # views into bigger buffers
    v = torch.randn(batch, 2, slots + 3, 16, generator=g)[:, :, :slots]
    pad = 3
    valid = torch.ones(batch, 2, slots, dtype=torch.bool)
    valid[0, :, :pad] = False
    positions = torch.arange(slots).expand(batch, 2, slots).clone()
    positions[0] -= pad
    positions[0, :, :pad] = 0  # padding slots hold no real position
    if per_head and past >= 4:
        positions[1, 1, :past] = torch.randperm(past, generator=g)
        valid[1, 1, 1:3] = False
    query_positions = positions[:, 0, past:].clone()
    return q.to(dtype), k.to(dtype), v.to(dtype), valid, positions, query_positions


# ---------------------------------------------------------------- cache attention reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("new_tokens,past", [(1, 13), (6, 9), (7, 0)])
@pytest.mark.parametrize("per_head", [False, True])
def test_cache_attention_reference_against_naive(dtype, softcap, window, new_tokens, past, per_head):
    q, k, v, valid, positions, query_positions = cache_inputs(dtype, new_tokens, past, per_head)
    slots = past + new_tokens
    if window is None:
        got = cache_attention_reference(q, k, v, valid, 0.25, softcap=softcap)
    else:
        got = cache_attention_reference(q, k, v, valid, 0.25, softcap=softcap, window=window,
                                        slot_positions=positions, query_positions=query_positions)
    visible = naive_visible(valid, positions, query_positions, window, new_tokens, slots, 2)
    want = naive_attention(q, k, v, visible, 0.25, softcap)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_cache_attention_reference_without_validity(softcap):
    """``valid=None`` (every slot live) with a window: the window alone decides what is dead."""
    q, k, v, _, positions, query_positions = cache_inputs(torch.float32, 5, 11, per_head=False, seed=1)
    positions = torch.arange(16).expand(2, 2, 16)
    query_positions = positions[:, 0, 11:]
    got = cache_attention_reference(q, k, v, None, 0.3, softcap=softcap, window=3,
                                    slot_positions=positions, query_positions=query_positions)
    want = naive_attention(q, k, v, naive_visible(None, positions, query_positions, 3, 5, 16, 2), 0.3, softcap)
    torch.testing.assert_close(got.double(), want, **TOL[torch.float32])


def test_softcap_changes_the_output():
    """Guards the tests above against caps too loose to matter."""
    q, k, v, valid, *_ = cache_inputs(torch.float32, 6, 9, per_head=False)
    capped = cache_attention_reference(q, k, v, valid, 0.25, softcap=4.0)
    assert not torch.allclose(capped, cache_attention_reference(q, k, v, valid, 0.25), atol=1e-2)


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("per_head", [False, True])
def test_decode_window_folds_into_validity(softcap, per_head):
    """One query token: the window is per slot, so ``window_valid`` turns it into the kernels' ``valid``."""
    q, k, v, valid, positions, query_positions = cache_inputs(torch.float32, 1, 13, per_head)
    folded = window_valid(valid, positions, query_positions, 5)
    assert folded.shape == valid.shape and folded.dtype == torch.bool
    assert torch.equal(folded, naive_visible(valid, positions, query_positions, 5, 1, 14, 2)[:, :, 0])
    windowed = cache_attention_reference(q, k, v, valid, 0.25, softcap=softcap, window=5,
                                         slot_positions=positions, query_positions=query_positions)
    assert torch.equal(windowed, cache_attention_reference(q, k, v, folded, 0.25, softcap=softcap))
    assert folded[:, 0, :9].logical_not().all()  # the window really drops slots here
    with pytest.raises(ValueError):
        window_valid(valid, positions, torch.zeros(2, 3, dtype=torch.long), 5)


def test_bad_arguments_are_refused():
    q, k, v, valid, *_ = cache_inputs(torch.float32, 2, 4, per_head=False)
    with pytest.raises(ValueError, match="softcap"):
        cache_attention_reference(q, k, v, valid, 0.25, softcap=0.0)
    with pytest.raises(ValueError, match="softcap"):
        decode_scores(q[:, :, :1], k, valid, 0.25, softcap=-1.0)
    with pytest.raises(ValueError, match="slot_positions"):
        cache_attention_reference(q, k, v, valid, 0.25, window=3)


# ---------------------------------------------------------------- sparse references


def sparse_inputs(dtype, per_kv_head: bool, seed: int = 4):
    """One decode token (Hq=4, Hkv=2) over 29 slots, row 0 left-padded by 3, and 9 chosen past slots per
    selecting head."""
    q, k, v, valid, *_ = cache_inputs(dtype, 1, 28, per_head=True, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    heads = 2 if per_kv_head else 4
    slots = torch.stack([torch.randperm(28, generator=g)[:9] for _ in range(2 * heads)]).view(2, heads, 9)
    return q, k, v, valid, slots


def naive_sparse_visible(valid, slots, heads: int, total: int):
    """``[B, Hq, 1, S]``: the slots chosen by the head's selecting row that are live, plus the own slot."""
    batch, hsel = slots.shape[:2]
    kv_heads = valid.shape[1]
    visible = torch.zeros(batch, heads, 1, total, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            chosen = {int(j) for j in slots[b, h // (heads // hsel)]}
            for j in range(total):
                live = bool(valid[b, h // (heads // kv_heads), j])
                visible[b, h, 0, j] = (j in chosen and live) or j == total - 1
    return visible


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_decode_scores_against_naive(dtype, softcap):
    q, k, _, valid, _ = sparse_inputs(dtype, per_kv_head=True)
    got = decode_scores(q, k, valid, 0.25, softcap=softcap)  # [B, Hkv, G, S]
    want = naive_scores(q, k, 0.25, softcap)[:, :, 0].view(2, 2, 2, 29)
    want = want.masked_fill(~valid[:, :, None, :], -math.inf)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    copy = k.transpose(-1, -2).contiguous()  # all channels of a channel-major copy: the same scores
    torch.testing.assert_close(ranking_scores(q, copy, valid, 0.25, softcap=softcap).double(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_sparse_attention_reference_against_naive(dtype, softcap, per_kv_head):
    q, k, v, valid, slots = sparse_inputs(dtype, per_kv_head)
    got = sparse_attention_reference(q, k, v, valid, slots, 0.25, softcap=softcap)
    visible = naive_sparse_visible(valid, slots, 4, 29)
    scores = naive_scores(q, k, 0.25, softcap).masked_fill(~visible, -math.inf)
    want = torch.matmul(scores.softmax(-1), v.double().repeat_interleave(2, dim=1))
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("per_kv_head", [False, True])
@pytest.mark.parametrize("sparse_output", [False, True])
def test_selection_reference_votes_with_capped_probabilities(softcap, per_kv_head, sparse_output):
    q, k, v, valid, _ = sparse_inputs(torch.float32, per_kv_head)
    out, slots = selection_attention_reference(q, k, v, valid, 0.25, 9, per_kv_head, sparse_output, softcap=softcap)
    scores = naive_scores(q, k, 0.25, softcap)  # [B, Hq, 1, S]
    past = scores[..., :-1].masked_fill(~valid.repeat_interleave(2, dim=1)[:, :, None, :-1], -math.inf)
    if per_kv_head:  # each KV head's two query heads vote with their (capped) probabilities
        ranking = past[:, :, 0].softmax(-1).view(2, 2, 2, 28).sum(2)
    else:
        ranking = past[:, :, 0]
    want_slots = ranking.topk(9, dim=-1).indices
    assert torch.equal(slots.sort(-1).values, want_slots.sort(-1).values)
    if sparse_output:
        visible = naive_sparse_visible(valid, want_slots, 4, 29)
    else:
        visible = valid.repeat_interleave(2, dim=1)[:, :, None, :].clone()
        visible[..., -1] = True
    weights = scores.masked_fill(~visible, -math.inf).softmax(-1)
    torch.testing.assert_close(out.double(), torch.matmul(weights, v.double().repeat_interleave(2, dim=1)),
                               rtol=1e-5, atol=1e-5)


def test_capped_votes_can_differ_from_raw_votes():
    """The cap flattens probabilities, so a per-KV-head vote over raw scores may choose other slots."""
    q, k, _, valid, _ = sparse_inputs(torch.float32, per_kv_head=True)
    differ = False
    for seed in range(8):
        q = 4 * torch.randn(q.shape, generator=torch.Generator().manual_seed(seed))
        raw = top_slots(decode_scores(q, k, valid, 0.25), 5, True).sort(-1).values
        capped = top_slots(decode_scores(q, k, valid, 0.25, softcap=1.0), 5, True).sort(-1).values
        differ |= not torch.equal(raw, capped)
    assert differ


# ---------------------------------------------------------------- Triton kernels (interpreter on CPU)


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("window", [None, 11])
def test_decode_kernel_matches_reference(softcap, window):
    """GQA, a left-padded row, per-head layout, 37 slots in blocks of 16 (three splits, a ragged last one)."""
    from tokenpass.kernels.decode_attention import decode_attention

    q, k, v, valid, positions, query_positions = cache_inputs(torch.float32, 1, 36, per_head=True, seed=6)
    if window is not None:
        valid = window_valid(valid, positions, query_positions, window)
    q, k, v, valid = (t.to(DEVICE) for t in (q, k, v, valid))
    out, scores = decode_attention(q, k, v, valid, 0.25, block_n=16, return_scores=True, softcap=softcap)
    torch.testing.assert_close(out, cache_attention_reference(q, k, v, valid, 0.25, softcap=softcap),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores, decode_scores(q, k, valid, 0.25, softcap=softcap), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(decode_attention(q, k, v, valid, 0.25, block_n=16, softcap=softcap), out)


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_selection_from_capped_kernel_scores_matches_reference(per_kv_head):
    from tokenpass.kernels.decode_attention import decode_attention

    q, k, v, valid, _ = (t.to(DEVICE) for t in sparse_inputs(torch.float32, per_kv_head, seed=7))
    out, scores = decode_attention(q, k, v, valid, 0.25, block_n=16, return_scores=True, softcap=2.0)
    ref_out, ref_slots = selection_attention_reference(q, k, v, valid, 0.25, 9, per_kv_head, False, softcap=2.0)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert torch.equal(top_slots(scores, 9, per_kv_head).sort(-1).values, ref_slots.sort(-1).values)


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("per_kv_head", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_decode_kernel_matches_reference(softcap, per_kv_head, dtype):
    from tokenpass.kernels.sparse_decode_attention import sparse_decode_attention

    q, k, v, valid, slots = (t.to(DEVICE) for t in sparse_inputs(dtype, per_kv_head, seed=8))
    got = sparse_decode_attention(q, k, v, valid, slots, 0.25, block_n=4, softcap=softcap)  # 10 slots, ragged
    want = sparse_attention_reference(q, k, v, valid, slots, 0.25, softcap=softcap)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter mis-computes bf16 tl.dot; a GPU check")
def test_decode_kernel_softcap_bf16_on_gpu():
    from tokenpass.kernels.decode_attention import decode_attention

    q, k, v, valid, positions, query_positions = cache_inputs(torch.bfloat16, 1, 300, per_head=True)
    valid = window_valid(valid, positions, query_positions, 128)
    q, k, v, valid = (t.to(DEVICE) for t in (q, k, v, valid))
    ref = cache_attention_reference(q.float(), k.float(), v.float(), valid, 0.25, softcap=4.0)
    got = decode_attention(q, k, v, valid, 0.25, softcap=4.0)
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- calls without the new arguments


def _legacy_step_mask(valid, new_tokens, slots):
    if valid is None and new_tokens == 1:
        return None
    query_slot = torch.arange(slots - new_tokens, slots, device=valid.device if valid is not None else "cpu")
    slot = torch.arange(slots, device=query_slot.device)
    causal = slot[None, :] <= query_slot[:, None]
    if valid is None:
        return causal[None, None]
    return (valid[:, :, None, :] & causal) | (slot[None, :] == query_slot[:, None])


def _legacy_grouped_attention(query, keys, values, mask, scale):
    b, hq, t, d = query.shape
    hkv = keys.shape[1]
    group = hq // hkv
    q = query.reshape(b, hkv, group * t, d)
    if mask is not None:
        s = mask.shape[-1]
        mask = mask[:, :, None].expand(b, mask.shape[1], group, t, s).reshape(b, -1, group * t, s)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, t, values.shape[-1])


def _legacy_cache_attention_reference(query, keys, values, valid, scale):
    """``cache_attention_reference`` as it was before soft-capping and windows (frozen copy)."""
    t, s = query.shape[2], keys.shape[2]
    if t == 1 or (valid is not None and not bool((valid == valid[:, :1]).all())):
        return _legacy_grouped_attention(query, keys, values, _legacy_step_mask(valid, t, s), scale)
    keys, values = expand_kv_heads(keys, query.shape[1]), expand_kv_heads(values, query.shape[1])
    if valid is None and s == t:
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale)
    mask = _legacy_step_mask(valid[:, :1] if valid is not None else None, t, s)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)


def _legacy_decode_scores(query, keys, valid, scale):
    b, hq, _, d = query.shape
    hkv = keys.shape[1]
    q = query.reshape(b, hkv, hq // hkv, d).float()
    scores = torch.matmul(q, keys.float().transpose(-1, -2)) * scale
    if valid is not None:
        scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    return scores


def _legacy_ranking_scores(query, score_keys, valid, scale, channels=0):
    b, hq, _, d = query.shape
    hkv, s = score_keys.shape[1], score_keys.shape[-1]
    q = query.reshape(b, hkv, hq // hkv, d).to(score_keys.dtype)
    if 0 < channels < d:
        picked = q.abs().float().sum(2).topk(channels, dim=-1).indices
        q = q.gather(-1, picked[:, :, None, :].expand(-1, -1, q.shape[2], -1))
        rows = (torch.arange(b * hkv, device=q.device).view(b, hkv, 1) * d + picked).reshape(-1)
        score_keys = score_keys.flatten(0, 2).index_select(0, rows).view(b, hkv, channels, s)
    scores = torch.matmul(q, score_keys).float() * scale
    if valid is not None:
        scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    return scores


def _legacy_sparse_attention_reference(query, keys, values, valid, slots, scale):
    b, hq, _, d = query.shape
    hkv, s = keys.shape[1], keys.shape[2]
    index = torch.cat([slots, slots.new_full((*slots.shape[:2], 1), s - 1)], dim=-1)
    hsel = index.shape[1]
    head = (torch.arange(hsel, device=index.device) // (hsel // hkv))[None, :, None]
    batch = torch.arange(b, device=index.device)[:, None, None]
    k_sel = cache_rows(keys).index_select(0, _row_index(keys, batch, head, index)).view(b, hsel, -1, d)
    v_sel = cache_rows(values).index_select(0, _row_index(values, batch, head, index)).view(b, hsel, -1, d)
    mask = None
    if valid is not None:
        mask = valid[batch, head, index]
        mask[..., -1] = True
        mask = mask[:, :, None, :]
    q = query.reshape(b, hsel, hq // hsel, d)
    out = F.scaled_dot_product_attention(q, k_sel, v_sel, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, 1, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("new_tokens,past", [(1, 13), (6, 9), (7, 0)])
@pytest.mark.parametrize("layout", ["all live", "shared", "per head"])
def test_cache_attention_without_new_arguments_is_unchanged(dtype, new_tokens, past, layout):
    q, k, v, valid, *_ = cache_inputs(dtype, new_tokens, past, per_head=layout == "per head", seed=9)
    valid = None if layout == "all live" else valid
    got = cache_attention_reference(q, k, v, valid, 0.25)
    assert torch.equal(got, _legacy_cache_attention_reference(q, k, v, valid, 0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_valid", [False, True])
def test_sparse_references_without_new_arguments_are_unchanged(dtype, with_valid):
    for per_kv_head in (False, True):
        q, k, v, valid, slots = sparse_inputs(dtype, per_kv_head, seed=10)
        valid = valid if with_valid else None
        assert torch.equal(decode_scores(q, k, valid, 0.25), _legacy_decode_scores(q, k, valid, 0.25))
        copy = k.transpose(-1, -2).contiguous()
        for channels in (0, 4):
            assert torch.equal(ranking_scores(q, copy, valid, 0.25, channels),
                               _legacy_ranking_scores(q, copy, valid, 0.25, channels))
        assert torch.equal(sparse_attention_reference(q, k, v, valid, slots, 0.25),
                           _legacy_sparse_attention_reference(q, k, v, valid, slots, 0.25))
        for sparse_output in (False, True):
            out, chosen = selection_attention_reference(q, k, v, valid, 0.25, 9, per_kv_head, sparse_output)
            want_slots = top_slots(_legacy_decode_scores(q, k, valid, 0.25), 9, per_kv_head)
            assert torch.equal(chosen, want_slots)
            if sparse_output:
                want = _legacy_sparse_attention_reference(q, k, v, valid, want_slots, 0.25)
            else:
                want = torch.matmul(_legacy_decode_scores(q, k, valid, 0.25).softmax(-1), v.float())
                want = want.reshape(2, 4, 1, 16).to(dtype)
            assert torch.equal(out, want)


def test_kernels_without_new_arguments_take_the_uncapped_path():
    """Leaving ``softcap`` out is ``softcap=None``: the constexpr-disabled branch, the kernel as it was."""
    from tokenpass.kernels.decode_attention import decode_attention
    from tokenpass.kernels.sparse_decode_attention import sparse_decode_attention

    q, k, v, valid, slots = (t.to(DEVICE) for t in sparse_inputs(torch.float32, False, seed=11))
    out, scores = decode_attention(q, k, v, valid, 0.25, block_n=16, return_scores=True)
    out_none, scores_none = decode_attention(q, k, v, valid, 0.25, block_n=16, return_scores=True, softcap=None)
    assert torch.equal(out, out_none) and torch.equal(scores, scores_none)
    torch.testing.assert_close(out, _legacy_cache_attention_reference(q, k, v, valid, 0.25), rtol=1e-4, atol=1e-5)
    got = sparse_decode_attention(q, k, v, valid, slots, 0.25, block_n=16)
    assert torch.equal(got, sparse_decode_attention(q, k, v, valid, slots, 0.25, block_n=16, softcap=None))
    torch.testing.assert_close(got, _legacy_sparse_attention_reference(q, k, v, valid, slots, 0.25),
                               rtol=1e-4, atol=1e-5)
