"""Triton kernels against their torch references (interpreter on CPU; on a GPU when one is present)."""

import pytest
import torch

from tokenpass.kernels.cache_attention_ref import cache_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(batch, heads, kv_heads, slots, head_dim, dtype=torch.float32, seed=0, capacity_pad=5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, head_dim, generator=g, dtype=dtype)
    # Views into larger buffers, as the runtime cache hands them to the kernel.
    k = torch.randn(batch, kv_heads, slots + capacity_pad, head_dim, generator=g, dtype=dtype)[:, :, :slots]
    v = torch.randn(batch, kv_heads, slots + capacity_pad, head_dim, generator=g, dtype=dtype)[:, :, :slots]
    return [t.to(DEVICE) for t in (q, k, v)]


@pytest.mark.parametrize("batch,heads,kv_heads,slots,head_dim", [
    (1, 9, 3, 70, 64),   # SmolLM2's heads, a slot count that is not a block multiple
    (2, 4, 4, 33, 16),   # no GQA
    (3, 8, 1, 130, 32),  # multi-query, several splits
])
def test_decode_attention_matches_reference(batch, heads, kv_heads, slots, head_dim):
    from tokenpass.kernels.decode_attention import decode_attention

    q, k, v = _inputs(batch, heads, kv_heads, slots, head_dim)
    scale = head_dim ** -0.5
    got = decode_attention(q, k, v, None, scale, block_n=16)
    torch.testing.assert_close(got, cache_attention_reference(q, k, v, None, scale), rtol=1e-4, atol=1e-5)


def test_decode_attention_respects_per_head_validity():
    from tokenpass.kernels.decode_attention import decode_attention

    q, k, v = _inputs(2, 6, 3, 50, 16, seed=1)
    g = torch.Generator().manual_seed(2)
    valid = (torch.rand(2, 3, 50, generator=g) > 0.4).to(DEVICE)
    valid[:, :, -1] = True  # the step's own token is always live
    valid[1, 0, :20] = False  # a whole chunk dead for one head
    got = decode_attention(q, k, v, valid, 0.25, block_n=16)
    torch.testing.assert_close(got, cache_attention_reference(q, k, v, valid, 0.25), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 tolerance is a GPU check")
def test_decode_attention_bf16_on_gpu():
    from tokenpass.kernels.decode_attention import decode_attention

    q, k, v = _inputs(1, 32, 8, 4096, 64, dtype=torch.bfloat16)
    ref = cache_attention_reference(q.float(), k.float(), v.float(), None, 0.125)
    torch.testing.assert_close(decode_attention(q, k, v, None, 0.125).float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_selection_scores_from_the_decode_kernel_match_reference(per_kv_head):
    from tokenpass.kernels.decode_attention import decode_attention
    from tokenpass.kernels.sparse_attention_ref import decode_scores, selection_attention_reference, top_slots

    q, k, v = _inputs(2, 6, 3, 45, 16, seed=3)
    out, scores = decode_attention(q, k, v, None, 0.25, block_n=16, return_scores=True)
    torch.testing.assert_close(scores, decode_scores(q, k, None, 0.25), rtol=1e-4, atol=1e-5)
    ref_out, ref_slots = selection_attention_reference(q, k, v, None, 0.25, 8, per_kv_head, False)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert torch.equal(top_slots(scores, 8, per_kv_head).sort(-1).values, ref_slots.sort(-1).values)


@pytest.mark.parametrize("per_kv_head,with_valid", [(False, False), (True, False), (False, True)])
def test_sparse_decode_kernel_matches_reference(per_kv_head, with_valid):
    from tokenpass.kernels.sparse_attention_ref import sparse_attention_reference
    from tokenpass.kernels.sparse_decode_attention import sparse_decode_attention

    q, k, v = _inputs(2, 8, 2, 90, 32, seed=4)
    g = torch.Generator().manual_seed(5)
    heads = 2 if per_kv_head else 8
    slots = torch.stack([torch.randperm(89, generator=g)[:21] for _ in range(2 * heads)]).view(2, heads, 21).to(DEVICE)
    valid = None
    if with_valid:
        valid = (torch.rand(2, 2, 90, generator=g) > 0.3).to(DEVICE)
        valid[:, :, -1] = True
    got = sparse_decode_attention(q, k, v, valid, slots, 0.2, block_n=16)
    torch.testing.assert_close(got, sparse_attention_reference(q, k, v, valid, slots, 0.2), rtol=1e-4, atol=1e-5)


def test_ranking_from_a_channel_major_copy():
    """All channels: the exact scores. A quarter: exact when the query lives on those channels, which the
    ranking finds by the query group's summed magnitude."""
    from tokenpass.kernels.sparse_attention_ref import decode_scores, ranking_scores

    q, k = torch.randn(2, 6, 1, 16), torch.randn(2, 3, 40, 16)
    copy = k.transpose(-1, -2).contiguous()  # [B, Hkv, D, S], as the runtime cache keeps it
    torch.testing.assert_close(ranking_scores(q, copy, None, 0.25), decode_scores(q, k, None, 0.25))
    assert not torch.allclose(ranking_scores(q, copy, None, 0.25, channels=4), decode_scores(q, k, None, 0.25))
    q[..., 4:] = 0
    torch.testing.assert_close(ranking_scores(q, copy, None, 0.25, channels=4), decode_scores(q, k, None, 0.25))
