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
