"""The CUDA path end to end: compiled Triton kernels at real head sizes in bf16, a model on the GPU, and
compiled steps under CUDA graphs. Skipped without a GPU (the CPU suite covers the same code through the
Triton interpreter and the meta device); run on a GPU machine with ``pytest tests/test_gpu.py``.
"""

import pytest
import torch

import tokenpass
from tokenpass.kernels.cache_attention_ref import cache_attention_reference
from tokenpass.kernels.sparse_attention_ref import sparse_attention_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = "cuda"


def _cache(batch: int, heads: int, kv_heads: int, slots: int, head_dim: int, seed: int = 0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    q = torch.randn(batch, heads, 1, head_dim, generator=g, device=CUDA, dtype=torch.bfloat16)
    # Views into a larger buffer, as the runtime cache hands them over.
    k = torch.randn(batch, kv_heads, slots + 7, head_dim, generator=g, device=CUDA, dtype=torch.bfloat16)[:, :, :slots]
    v = torch.randn(batch, kv_heads, slots + 7, head_dim, generator=g, device=CUDA, dtype=torch.bfloat16)[:, :, :slots]
    return q, k, v


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("batch,slots", [(1, 4099), (8, 1000)])
def test_dense_decode_kernel_bf16_default_blocks(head_dim, batch, slots):
    from tokenpass.kernels.decode_attention import decode_attention

    q, k, v = _cache(batch, 32, 8, slots, head_dim)
    scale = head_dim ** -0.5
    ref = cache_attention_reference(q.float(), k.float(), v.float(), None, scale)
    torch.testing.assert_close(decode_attention(q, k, v, None, scale).float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_sparse_decode_kernel_bf16_default_blocks(head_dim):
    from tokenpass.kernels.sparse_decode_attention import sparse_decode_attention

    q, k, v = _cache(2, 32, 8, 3000, head_dim, seed=1)
    g = torch.Generator(device=CUDA).manual_seed(2)
    slots = torch.rand(2, 8, 2999, generator=g, device=CUDA).topk(512, dim=-1).indices
    scale = head_dim ** -0.5
    ref = sparse_attention_reference(q.float(), k.float(), v.float(), None, slots, scale)
    torch.testing.assert_close(sparse_decode_attention(q, k, v, None, slots, scale).float(), ref, rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def tiny_cuda():
    return tokenpass.tiny("llama").to(CUDA, torch.bfloat16)


def _prompts():
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0)).to(CUDA)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    return ids, mask


def test_generate_on_the_gpu_equals_hf_greedy(tiny_cuda):
    ids, mask = _prompts()
    optimized = tokenpass.optimize(tiny_cuda)
    assert optimized.spec.device.type == CUDA and optimized.lowered
    ours = optimized.generate(ids, attention_mask=mask, max_new_tokens=16)
    with torch.no_grad():
        hf = tiny_cuda.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert ours.device.type == CUDA
    # bf16 near-ties may flip late tokens: the first 8 must agree for every row.
    assert torch.equal(ours[:, : ids.shape[1] + 8], hf[:, : ids.shape[1] + 8])


def test_compiled_steps_under_cuda_graphs_give_the_eager_tokens(tiny_cuda):
    ids, mask = _prompts()
    eager = tokenpass.optimize(tiny_cuda)
    compiled = eager.compiled()
    expected = eager.generate(ids, attention_mask=mask, max_new_tokens=16)
    assert torch.equal(compiled.generate(ids, attention_mask=mask, max_new_tokens=16), expected)
    assert torch.equal(compiled.generate(ids, attention_mask=mask, max_new_tokens=16), expected)  # replayed
    decode = [entry for entry in compiled.compile_report.entries if entry.bucket.phase == "decode"]
    assert decode and all(entry.cudagraphs for entry in decode)
    assert compiled.compile_report.recompiles == 0
