"""Cut Cross-Entropy's op and kernels, in the reference's style: gt = float64, ref = torch in the test dtype
(materialised logits + ``F.cross_entropy``), and ours must satisfy ``|ours - gt| <= |ref - gt| + tol`` for
the loss, the LSE and every gradient. The chunked CPU path runs as is; the Triton kernels run under the
interpreter (``TRITON_INTERPRET=1``, set in conftest) through the same op on small shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import tokenpass.methods  # noqa: F401 - registers the ops
from tokenpass.errors import TokenpassError
from tokenpass.kernels import linear_cross_entropy_ref as ref
from tokenpass.methods.cutcrossentropy import linear_cross_entropy, ops

IGNORE = -100


def _inputs(rows, vocab, features, dtype, bias, seed=0, ignore_fraction=0.2, batch=1, scale=2.0):
    """Hidden ``[batch, rows, D]``, weight, targets with ~20% ignored, optional bias; logits of std ~``scale``."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, rows, features, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, features, generator=g, dtype=torch.float64) * (scale / math.sqrt(features))
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, vocab, (batch, rows), generator=g)
    targets[torch.rand(batch, rows, generator=g) < ignore_fraction] = IGNORE
    return hidden, weight, targets, b


def _torch_ref(hidden, weight, targets, bias, softcap, reduction, shift):
    """What a user writes with torch, in the inputs' dtype: full logits, shift by slicing, ``F.cross_entropy``."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    t = targets
    if shift:
        logits, t = logits[..., :-shift, :], targets[..., shift:]
    loss = F.cross_entropy(logits.flatten(0, -2), t.flatten(), ignore_index=IGNORE, reduction=reduction)
    lse = torch.logsumexp(logits, -1).masked_fill(t == IGNORE, 0)
    if shift:
        pad = lse.new_zeros((*lse.shape[:-1], shift))
        lse = torch.cat([lse, pad], -1)
        if reduction == "none":
            loss = torch.cat([loss.view(t.shape), pad], -1)
    return loss.view(targets.shape) if reduction == "none" else loss, lse


def _loss_and_grads(fn, hidden, weight, targets, bias, dtype, zloss=True, **options):
    """Loss, LSE and the gradients of a fixed objective; ``zloss`` adds ``lse``'s (its gradient path)."""
    h = hidden.detach().to(dtype).clone().requires_grad_()
    w = weight.detach().to(dtype).clone().requires_grad_()
    b = None if bias is None else bias.detach().to(dtype).clone().requires_grad_()
    loss, lse = fn(h, w, targets, b, **options)
    g = torch.Generator().manual_seed(7)
    weights = torch.rand(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype) if loss.dim() else 1.0
    objective = (loss * weights).sum()
    (objective + 1e-2 * lse.float().pow(2).sum() if zloss else objective).backward()
    grads = [h.grad, w.grad] + ([] if b is None else [b.grad])
    return [t.detach().double() for t in [loss, lse, *grads]]


def _ours(h, w, t, b, softcap, reduction, shift, filter_eps=None, fused=None):
    return linear_cross_entropy(h, w, t, b, IGNORE, softcap, reduction, shift, filter_eps=filter_eps, return_lse=True,
                                fused=fused)


def _gt(h, w, t, b, softcap, reduction, shift):
    return ref.linear_cross_entropy_reference(h, w, t, b, IGNORE, softcap, reduction, shift)


def _assert_no_worse(ours, torch_ref, gt, tol):
    names = ["loss", "lse", "d_hidden", "d_weight", "d_bias"]
    for name, o, r, g in zip(names, ours, torch_ref, gt):
        scale = g.abs().max().item() + 1.0
        err_ours, err_ref = (o - g).abs().max().item(), (r - g).abs().max().item()
        assert err_ours <= err_ref + tol * scale, f"{name}: ours {err_ours:.3g} vs torch {err_ref:.3g}"


def _use_triton(monkeypatch) -> None:
    """Route the op to the Triton kernels (interpreter on the CPU) with blocks the small shapes overhang."""
    from tokenpass.kernels import linear_cross_entropy as kernels

    blocks = dict(block_b=64, block_v=128, block_d=64)
    monkeypatch.setattr(ops, "_uses_kernels", lambda hidden: True)
    monkeypatch.setattr(ops, "_lse_forward", lambda rows, weight, bias, softcap: kernels.lse_forward(
        rows.hidden, weight, rows.targets, bias, softcap, **blocks))
    monkeypatch.setattr(ops, "_backward", lambda rows, weight, bias, lse, g_nll, g_lse, softcap, eps: kernels.backward(
        rows.hidden, weight, rows.targets, lse, g_nll, g_lse, bias, softcap, eps, **blocks))


def _use_small_chunks(monkeypatch) -> None:
    """Several token and vocabulary chunks on the CPU path even on these small shapes."""
    monkeypatch.setattr(ref, "CPU_TOKEN_CHUNK", 100)
    monkeypatch.setattr(ref, "CPU_CHUNK_ELEMENTS", 100 * 150)  # the fused op: 29 rows of 507
    monkeypatch.setattr(ref, "FUSED_MIN_ROWS", 1)  # ... which it still takes for scalar losses


@pytest.fixture(params=["chunked", "triton"])
def path(request, monkeypatch):
    """Run the op on the chunked CPU path or on the Triton kernels."""
    (_use_triton if request.param == "triton" else _use_small_chunks)(monkeypatch)
    return request.param


def _check_fp32(reduction, softcap, bias, shift, zloss=True, fused=None):
    hidden, weight, targets, b = _inputs(126, 507, 123, torch.float64, bias, batch=2)  # 252 rows, odd D
    options = dict(softcap=softcap, reduction=reduction, shift=shift, zloss=zloss)
    gt = _loss_and_grads(_gt, hidden, weight, targets, b, torch.float64, **options)
    torch_ref = _loss_and_grads(_torch_ref, hidden, weight, targets, b, torch.float32, **options)
    ours = _loss_and_grads(_ours, hidden, weight, targets, b, torch.float32, fused=fused, **options)
    _assert_no_worse(ours, torch_ref, gt, tol=1e-6)


_CPU_CASES = [  # per-row losses always take the recomputing op, so only scalar ones vary the z-loss
    (reduction, softcap, bias, shift, zloss)
    for reduction in ("mean", "sum", "none") for softcap in (None, 3.0) for bias in (False, True) for shift in (0, 1)
    for zloss in ((True,) if reduction == "none" else (False, True))
]


@pytest.mark.parametrize("reduction,softcap,bias,shift,zloss", _CPU_CASES)
def test_cpu_matches_ground_truth_fp32(monkeypatch, reduction, softcap, bias, shift, zloss):
    """Scalar losses take the one-pass fused op (a z-loss falls back to the recomputing backward)."""
    _use_small_chunks(monkeypatch)
    _check_fp32(reduction, softcap, bias, shift, zloss)


@pytest.mark.parametrize("reduction,softcap,bias,shift", [("mean", 3.0, True, 1), ("sum", None, False, 0)])
def test_cpu_recomputing_op_matches_ground_truth_fp32(monkeypatch, reduction, softcap, bias, shift):
    _use_small_chunks(monkeypatch)
    _check_fp32(reduction, softcap, bias, shift, zloss=False, fused=False)


def test_fused_op_refuses_a_second_backward():
    hidden, weight, targets, _ = _inputs(10, 40, 8, torch.float32, False)
    h = hidden.float().requires_grad_()
    loss = linear_cross_entropy(h, weight.float(), targets, fused=True)
    loss.backward(retain_graph=True)
    with pytest.raises(TokenpassError, match="already used"):
        loss.backward()


@pytest.mark.parametrize("reduction,softcap,bias,shift", [  # every value of every option, pairwise-ish
    ("mean", None, False, 0), ("mean", 3.0, True, 1), ("sum", 3.0, False, 1),
    ("sum", None, True, 0), ("none", 3.0, True, 0), ("none", None, False, 1),
])
def test_triton_matches_ground_truth_fp32(monkeypatch, reduction, softcap, bias, shift):
    _use_triton(monkeypatch)
    _check_fp32(reduction, softcap, bias, shift)


@pytest.mark.parametrize("reduction,softcap,bias,shift", [("mean", None, False, 1), ("sum", 3.0, True, 0),
                                                          ("none", 3.0, True, 0)])
def test_matches_ground_truth_bf16_cpu(monkeypatch, reduction, softcap, bias, shift):
    """bf16 inputs: ours accumulates in fp32, so it is far closer to gt than torch's bf16 logits. Small
    chunks: the fused op converts the bf16 head to fp32 piece by piece."""
    _use_small_chunks(monkeypatch)
    hidden, weight, targets, b = _inputs(60, 131, 37, torch.float64, bias, batch=2)
    hidden, weight = hidden.bfloat16().double(), weight.bfloat16().double()  # gt sees the rounded inputs
    b = None if b is None else b.bfloat16().double()
    options = dict(softcap=softcap, reduction=reduction, shift=shift, zloss=reduction == "none")  # fused path
    gt = _loss_and_grads(_gt, hidden, weight, targets, b, torch.float64, **options)
    torch_ref = _loss_and_grads(_torch_ref, hidden, weight, targets, b, torch.bfloat16, **options)
    ours = _loss_and_grads(_ours, hidden, weight, targets, b, torch.bfloat16, **options)
    _assert_no_worse(ours, torch_ref, gt, tol=1e-3)


def _peaked(seed=3):
    """A peaked softmax: half the vocabulary has near-zero weights, far below the rows' large logits, and no
    target falls there, so whole tiles have ``|softmax - onehot| < eps``."""
    hidden, weight, targets, _ = _inputs(64, 256, 32, torch.float64, False, seed=seed, ignore_fraction=0.0, scale=12.0)
    weight[:128] *= 1e-3
    targets = targets % 128 + 128
    return hidden, weight, targets


@pytest.mark.parametrize("sort_vocab", [False, True])
def test_filtering_skips_negligible_tiles_and_stays_accurate(sort_vocab):
    from tokenpass.kernels.linear_cross_entropy import backward

    hidden, weight, targets = _peaked()
    h, w, t = hidden[0].float(), weight.float(), targets[0]
    lse, _ = ref.chunked_lse_forward(h, w, t)
    g = torch.ones(h.shape[0])
    exact = backward(h, w, t, lse, g, filter_eps=None, sort_vocab=sort_vocab, block_b=32, block_v=32)
    filtered = backward(h, w, t, lse, g, filter_eps=ref.resolve_filter_eps("auto", torch.float32),
                        sort_vocab=sort_vocab, block_b=32, block_v=32)
    skipped = (filtered[1] == 0).all(1)
    assert skipped.sum() >= 64 and not (exact[1] == 0).all(1).any()  # tiles were skipped, exact has them
    torch.testing.assert_close(filtered[0], exact[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(filtered[1], exact[1], rtol=0, atol=1e-6)


def test_filtering_through_the_op_with_bias_matches_ground_truth(path):
    hidden, weight, targets = _peaked(seed=4)
    b = torch.zeros(weight.shape[0], dtype=torch.float64)
    b[:128] = -5.0  # bias on the filtered tiles: their bias gradient is skipped with them, consistently
    options = dict(softcap=None, reduction="mean", shift=0)
    gt = _loss_and_grads(_gt, hidden, weight, targets, b, torch.float64, **options)
    torch_ref = _loss_and_grads(_torch_ref, hidden, weight, targets, b, torch.float32, **options)
    ours = _loss_and_grads(_ours, hidden, weight, targets, b, torch.float32, filter_eps="auto", **options)
    _assert_no_worse(ours, torch_ref, gt, tol=1e-6)


def test_padding_lanes_are_masked_after_the_softcap(path):
    """33 vocabulary entries in 64-wide tiles: 31 padding lanes would each add ``exp(-cap - lse)`` to the
    sum if masked before the cap (``cap * tanh(-inf) = -cap`` is finite)."""
    hidden, weight, targets, _ = _inputs(40, 33, 16, torch.float64, False, ignore_fraction=0.0)
    options = dict(softcap=1.0, reduction="none", shift=0)
    loss, lse = _ours(hidden.float(), weight.float(), targets, None, **options)
    gt_loss, gt_lse = _gt(hidden, weight, targets, None, **options)
    torch.testing.assert_close(lse.double(), gt_lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss.double(), gt_loss, rtol=0, atol=1e-5)


def test_losses_are_never_negative_with_large_logits(path):
    """The target logit comes from the same tiles as the LSE, so ``lse - z_target >= 0`` even when the
    target dominates and the loss is ~0."""
    hidden, weight, targets, _ = _inputs(64, 100, 16, torch.float64, False, ignore_fraction=0.0, scale=60.0)
    targets = (hidden[0].float() @ weight.float().T).argmax(-1)[None]
    loss, _ = _ours(hidden.float(), weight.float(), targets, None, None, "none", 0)
    assert (loss >= 0).all()


def test_ignored_rows_cost_nothing_and_all_ignored_matches_torch(path):
    hidden, weight, targets, _ = _inputs(20, 50, 8, torch.float32, False)
    targets[:] = IGNORE
    h = hidden.float().requires_grad_()
    w = weight.float().requires_grad_()
    total = linear_cross_entropy(h, w, targets, reduction="sum")
    total.backward()
    assert total.item() == 0 and not h.grad.any() and not w.grad.any()
    mean = linear_cross_entropy(h.detach(), w.detach(), targets, reduction="mean")
    expected = F.cross_entropy(h.detach()[0] @ w.detach().T, targets[0], ignore_index=IGNORE)
    assert math.isnan(mean.item()) and math.isnan(expected.item())


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (inputs, intermediates, gradients alike)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("fused", [True, False])
def test_cpu_path_never_holds_tokens_by_vocabulary(monkeypatch, fused):
    monkeypatch.setattr(ref, "CPU_CHUNK_ELEMENTS", 1 << 20)  # the mechanism, at a sixteenth of the logits
    rows, vocab, features = 2048, 8192, 32
    hidden, weight, targets, b = _inputs(rows, vocab, features, torch.float32, True, ignore_fraction=0.1)
    h, w, bb = hidden.float().requires_grad_(), weight.float().requires_grad_(), b.float().requires_grad_()
    with _LargestTensor() as mode:
        linear_cross_entropy(h, w, targets, bb, softcap=30.0, fused=fused).backward()
    assert mode.largest <= ref.CPU_CHUNK_ELEMENTS


def test_tied_embedding_gets_both_gradients():
    """A tiny tied LM: the embedding matrix is also the head. Ours through the op equals HF-style full logits
    with a causal shift, for the loss and the (accumulated) tied weight gradient."""
    vocab, features = 97, 24
    g = torch.Generator().manual_seed(5)
    embedding = torch.randn(vocab, features, generator=g, dtype=torch.float64)
    mix = torch.randn(features, features, generator=g, dtype=torch.float64) / features ** 0.5
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = IGNORE

    def run(head):
        weight = embedding.clone().requires_grad_()
        hidden = torch.tanh(F.embedding(ids, weight) @ mix)
        loss = head(hidden, weight)
        loss.backward()
        return loss.detach(), weight.grad

    def hf_style(hidden, weight):
        logits = hidden @ weight.T  # float64 here; HF upcasts low-precision logits to fp32
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)

    def ours(hidden, weight):
        return linear_cross_entropy(hidden, weight, labels, shift=1, filter_eps=None)

    loss_ref, grad_ref = run(hf_style)
    loss_ours, grad_ours = run(ours)
    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-10, atol=1e-12)


def test_the_op_passes_opcheck():
    hidden, weight, targets, b = _inputs(10, 40, 8, torch.float32, True)
    h, w, bb = hidden.float().requires_grad_(), weight.float().requires_grad_(), b.float().requires_grad_()
    for reduction in ("mean", "none"):
        args = (h, w, targets, bb, IGNORE, 2.0, reduction, 1, None)
        torch.library.opcheck(ops.linear_cross_entropy_op_overload, args)
    torch.library.opcheck(ops.linear_cross_entropy_fused_overload, (h, w, targets, bb, IGNORE, 2.0, "sum", 1),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("change,message", [
    (dict(targets=lambda t: t.masked_fill(t == 3, 50)), "targets must be in"),
    (dict(weight=lambda w: w[:, :-1]), "features"),
    (dict(weight=lambda w: w.double()), "dtype"),
    (dict(targets=lambda t: t[:, :-1]), "targets shape"),
    (dict(bias=lambda b: b[:-1]), "bias"),
    (dict(reduction="avg"), "reduction"),
    (dict(softcap=-1.0), "softcap"),
    (dict(shift=-1), "shift"),
    (dict(filter_eps="fast"), "filter_eps"),
])
def test_bad_input_fails_with_one_clear_line(change, message):
    hidden, weight, targets, b = _inputs(10, 40, 8, torch.float32, True)
    targets[0, :] = 3
    args = dict(hidden=hidden.float(), weight=weight.float(), targets=targets, bias=b.float())
    kwargs = {}
    for key, value in change.items():
        if key in args:
            args[key] = value(args[key])
        else:
            kwargs[key] = value
    with pytest.raises(TokenpassError, match=message) as error:
        linear_cross_entropy(**args, **kwargs)
    assert "\n" not in str(error.value)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(0, 30), vocab=st.integers(1, 70), features=st.integers(1, 20),
    token_chunk=st.integers(1, 16), vocab_chunk=st.integers(1, 32), softcap=st.sampled_from([None, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_chunked_path_equals_reference_on_random_shapes(rows, vocab, features, token_chunk, vocab_chunk, softcap,
                                                        seed):
    """Any chunking gives the materialised reference's LSE and gradients (float64, so equality is tight)."""
    hidden, weight, targets, b = _inputs(rows, vocab, features, torch.float64, True, seed=seed)
    rows_ = ref.prepare_rows(hidden, targets, vocab, IGNORE)
    lse, picked = ref.chunked_lse_forward(rows_.hidden, weight, rows_.targets, b, softcap, token_chunk, vocab_chunk)
    h, w, bb = hidden.clone().requires_grad_(), weight.clone().requires_grad_(), b.clone().requires_grad_()
    loss, gt_lse = ref.linear_cross_entropy_reference(h, w, targets, bb, IGNORE, softcap, "sum")
    torch.testing.assert_close(ref.scatter_rows(lse, rows_), gt_lse)
    torch.testing.assert_close((lse - picked).sum(), loss.detach())
    loss.backward()
    grad_nll = torch.ones(lse.shape[0], dtype=torch.float64)
    d_rows, d_w, d_b = ref.chunked_backward(rows_.hidden, weight, rows_.targets, lse, grad_nll, None, b, softcap, None,
                                            token_chunk, vocab_chunk)
    torch.testing.assert_close(ref.scatter_rows(d_rows, rows_).view(h.shape), h.grad)
    torch.testing.assert_close(d_w, w.grad)
    torch.testing.assert_close(d_b, bb.grad)
    fused = ref.chunked_forward_backward(rows_.hidden, weight, rows_.targets, b, softcap, token_chunk)
    for got, expected in zip(fused, (lse, picked, d_rows, d_w, d_b)):
        torch.testing.assert_close(got, expected)


def test_equals_hf_loss_and_every_gradient_on_a_tiny_tied_llama():
    """HF's own training loss (causal shift, -100 labels, mean) against the op on the model's final hidden
    states, with the head tied to the embedding: the loss and every parameter's gradient agree."""
    from conftest import hf_tiny

    model = hf_tiny("llama", tie_word_embeddings=True).train()  # fp32: HF's loss upcasts logits to fp32 anyway
    assert model.lm_head.weight is model.model.embed_tokens.weight
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 320, (2, 13), generator=g)
    labels = ids.clone()
    labels[1, :5] = IGNORE

    def gradients(loss):
        model.zero_grad()
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    loss_hf = model(input_ids=ids, labels=labels).loss
    grads_hf = gradients(loss_hf)
    hidden = model.model(input_ids=ids).last_hidden_state
    loss_ours = linear_cross_entropy(hidden, model.lm_head.weight, labels, shift=1, filter_eps=None)
    grads_ours = gradients(loss_ours)
    torch.testing.assert_close(loss_ours, loss_hf, rtol=0, atol=1e-5)
    for name, grad in grads_hf.items():
        torch.testing.assert_close(grads_ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)


_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tokenpass.kernels import linear_cross_entropy as K

def compile(fn, types, consts):
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32))

for dt in ("fp32", "bf16"):
    common = dict(E="*" + dt, C="*" + dt, BIAS="*" + dt, TARGETS="*i64", softcap="fp32")
    compile(K._lse_forward_kernel, dict(common, M_OUT="*fp32", S_OUT="*fp32", Z_OUT="*fp32"),
            dict(HAS_BIAS=True, SOFTCAP=True, IEEE=dt == "fp32", BLOCK_B=64, BLOCK_V=128, BLOCK_D=64))
    compile(K._backward_kernel, dict(common, LSE="*fp32", G_NLL="*fp32", G_LSE="*fp32", ORDER="*i64", D_E="*fp32",
                                     D_C="*fp32", D_BIAS="*fp32", filter_eps="fp32"),
            dict(HAS_BIAS=True, HAS_G_LSE=True, HAS_ORDER=True, SOFTCAP=True, FILTER=True, IEEE=dt == "fp32",
                 BLOCK_B=64, BLOCK_V=64, BLOCK_D=64, GROUP_B=8))
"""


def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter does not type-check like the compiler does (e.g. the filter's data-dependent ``if``):
    compile both kernels for sm_90, fp32 and bf16, with every option on, in a process without the
    interpreter."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=300)
    if "No module named 'triton.backends.nvidia'" in done.stderr:
        pytest.skip("this triton has no CUDA backend")
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_wrapper_takes_the_fused_op_only_where_it_pays_off():
    """CPU, a scalar loss under autograd, and whole-vocabulary chunks tall enough (SmolLM2's head, not
    Gemma's): otherwise the recomputing op."""
    hidden = torch.zeros(4, 8, requires_grad=True)
    smollm2, gemma = torch.zeros(49152, 8), torch.zeros(256000, 8)
    assert ops._wants_fused(hidden, smollm2, None, "mean")
    assert not ops._wants_fused(hidden, gemma, None, "mean")
    assert not ops._wants_fused(hidden, smollm2, None, "none")
    assert not ops._wants_fused(hidden.detach(), smollm2, None, "sum")
    with torch.no_grad():
        assert not ops._wants_fused(hidden, smollm2, None, "sum")
