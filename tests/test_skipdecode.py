"""SkipDecode: the gated decode step and the masked training step against an independent reference.

The reference is the Hugging Face model itself with forward hooks that make each decoder layer the
identity at the positions the schedule skips, run over the whole sequence at once. Decoding under the
gate, token by token over the runtime cache, must give the same logits: that is the KV invariant at work
(a layer that runs at a position finds keys for every earlier position, and never reads a skipped one).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenpass
from tokenpass import PassError, SkipDecode, TokenpassError
from tokenpass.api import capture, fork, optimize_graphs
from tokenpass.methods.skipdecode import LinearSchedule
from tokenpass.methods.skipdecode.runtime import LAST_RUN
from tokenpass.runtime.generate import positions_from_mask

from conftest import padded_batch, teacher_forced

PROMPT = 8
NEW = 8


def masked_reference(model, schedule: LinearSchedule, start: int):
    """Hooks making layer ``l`` the identity where ``schedule`` skips it (positions are sequence columns)."""
    layers = model.model.layers if hasattr(model, "model") else model.transformer.h

    def hook(index: int):
        def apply(module, args, kwargs, out):
            hidden = args[0] if args else kwargs["hidden_states"]
            runs = torch.tensor([schedule.runs(index, t, start) for t in range(hidden.shape[1])])[None, :, None]
            if isinstance(out, tuple):
                return (torch.where(runs, out[0], hidden), *out[1:])
            return torch.where(runs, out, hidden)
        return apply

    return [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]


def reference_logits(model, schedule, start, ids, mask):
    handles = masked_reference(model, schedule, start)
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    finally:
        for handle in handles:
            handle.remove()


def report(optimized, phase: str = "decode"):
    return next(r for r in optimized.reports[phase] if r.pass_name == "skipdecode")


def sequence(vocab: int, batch: int = 2, seed: int = 1):
    ids, mask = padded_batch(vocab, batch=batch, length=PROMPT + NEW, pad=3, seed=seed)
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi3"])
def test_decode_equals_masked_reference(family):
    """Positive: the skippable layers are gated (by count) and decoding equals the masked model."""
    model = tokenpass.tiny(family)
    p = SkipDecode(min_layers=2, max_layers=4, warmup=1, max_length=PROMPT + 5, debug=True)
    optimized = tokenpass.optimize(model, [p])
    counts = report(optimized).counts
    assert counts["gated_layers"] == counts["skippable_layers"] == 2
    ids, mask = sequence(model.config.vocab_size)
    with torch.no_grad():
        logits, _ = teacher_forced(optimized, ids, mask, PROMPT)
    expected = reference_logits(model, p.schedule(4), PROMPT, ids, mask)[:, PROMPT - 1 : -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    dense = reference_logits(model, p.schedule(4), 10**6, ids, mask)[:, PROMPT - 1 : -1]
    assert (logits - dense).abs().max() > 1e-2  # the schedule really skipped layers


def test_full_depth_reproduces_dense_greedy():
    """max_layers = min_layers = L: no layer is gated and generation is dense's, token for token."""
    model = tokenpass.tiny("llama")
    ids, mask = padded_batch(model.config.vocab_size)
    optimized = tokenpass.optimize(model, [SkipDecode(min_layers=4, max_layers=4, warmup=1)])
    assert report(optimized).counts["gated_layers"] == 0
    dense = tokenpass.optimize(model, [])
    assert torch.equal(optimized.generate(ids, mask, max_new_tokens=10), dense.generate(ids, mask, max_new_tokens=10))


def test_schedule_not_yet_reached_is_dense():
    """Gated layers that the schedule keeps running leave generation exactly dense."""
    model = tokenpass.tiny("llama")
    ids, mask = padded_batch(model.config.vocab_size)
    optimized = tokenpass.optimize(model, [SkipDecode(min_layers=2, max_layers=4, warmup=1, max_length=10**4)])
    assert report(optimized).counts["gated_layers"] == 2
    dense = tokenpass.optimize(model, [])
    # the depth falls below 4 only after ~2500 positions: these 6 steps run every layer
    assert torch.equal(optimized.generate(ids, mask, max_new_tokens=6), dense.generate(ids, mask, max_new_tokens=6))


def test_left_padded_rows_equal_rows_alone():
    """A ragged left-padded batch of 3: each row equals that row run alone (the exit point is shared by
    cache slot, which left padding keeps aligned)."""
    model = tokenpass.tiny("qwen2")
    optimized = tokenpass.optimize(model, [SkipDecode(min_layers=2, warmup=1, max_length=PROMPT + 4)])
    ids, mask = padded_batch(model.config.vocab_size, batch=3, length=PROMPT + NEW, pad=3)
    mask[1, :5] = 0
    with torch.no_grad():
        batch, _ = teacher_forced(optimized, ids, mask, PROMPT)
        for row in range(3):
            alone, _ = teacher_forced(optimized, ids[row : row + 1], mask[row : row + 1], PROMPT)
            torch.testing.assert_close(batch[row : row + 1], alone, atol=1e-4, rtol=1e-4)


def test_idempotent():
    model = tokenpass.tiny("llama")
    graphs = capture(model)
    once = optimize_graphs(graphs, [SkipDecode(min_layers=2, warmup=1)])
    again = optimize_graphs(once.graphs, [SkipDecode(min_layers=2, warmup=1)])
    assert report(again).counts["already_applied"] == 1 and not report(again).modified


@pytest.fixture(scope="module")
def captured_llama():
    model = tokenpass.tiny("llama")
    return model, capture(model)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 4),
    bounds=st.tuples(st.integers(2, 4), st.integers(2, 4)).map(sorted),
    warmup=st.integers(0, 1),
    span=st.integers(1, 12),
    seed=st.integers(0, 100),
)
def test_kv_invariant_random_schedules(captured_llama, batch, bounds, warmup, span, seed):
    """Random schedules and batch sizes: the debug gate never sees a layer run after it was skipped, each
    layer's live decode slots are a prefix of the decoded positions, and the logits equal the masked
    model's."""
    model, graphs = captured_llama
    low, high = bounds
    p = SkipDecode(min_layers=low, max_layers=high, warmup=warmup, max_length=PROMPT + span, debug=True)
    optimized = optimize_graphs(fork(graphs), [p])
    ids, mask = padded_batch(model.config.vocab_size, batch=batch, length=PROMPT + NEW, pad=2, seed=seed)
    with torch.no_grad():
        logits, session = teacher_forced(optimized, ids, mask, PROMPT)
    for layer, cache in enumerate(session.cache.layers):
        live = cache.valid[:, 0, PROMPT : cache.length].all(0).tolist()  # decode slots: every row real
        ran = [p.schedule(4).runs(layer, t, PROMPT) for t in range(PROMPT, cache.length)]
        assert live == ran and live == sorted(live, reverse=True), f"layer {layer}"
    expected = reference_logits(model, p.schedule(4), PROMPT, ids, mask)[:, PROMPT - 1 : -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_debug_gate_catches_a_broken_invariant(captured_llama):
    model, graphs = captured_llama
    optimized = optimize_graphs(fork(graphs), [SkipDecode(min_layers=2, warmup=1, max_length=PROMPT + 10, debug=True)])
    ids, mask = padded_batch(model.config.vocab_size, length=PROMPT + 2)
    session = optimized.session(2, capacity=PROMPT + 2)
    positions = positions_from_mask(mask)
    with torch.no_grad():
        session.step(ids[:, :PROMPT], mask[:, :PROMPT], positions[:, :PROMPT])
        session.step(ids[:, PROMPT : PROMPT + 1], mask[:, PROMPT : PROMPT + 1], positions[:, PROMPT : PROMPT + 1])
        session.cache.notes[LAST_RUN] = {}  # as if the gated layers had skipped the last step
        with pytest.raises(TokenpassError, match="KV invariant violated: layer 1 runs at slot 9"):
            session.step(ids[:, -1:], mask[:, -1:], positions[:, -1:])


def test_training_step_equals_masked_reference():
    """The masked training step (with the fused loss) gives the masked model's loss and gradients."""
    model = tokenpass.tiny("llama")
    p = SkipDecode(min_layers=2, max_layers=3, warmup=1, max_length=14, start=6)
    trained = tokenpass.optimize(model, [p, tokenpass.CutCrossEntropy()], phases=["train"])
    assert report(trained, "train").counts["masked_layers"] == 2
    ids, mask = padded_batch(model.config.vocab_size, length=16)
    labels = ids.masked_fill(mask == 0, -100)
    loss = trained(ids, mask, labels=labels).loss
    loss.backward()
    ours = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    handles = masked_reference(model, p.schedule(4), 6)
    try:
        expected = model(input_ids=ids, attention_mask=mask, labels=labels)
    finally:
        for handle in handles:
            handle.remove()
    expected.loss.backward()
    torch.testing.assert_close(loss, expected.loss, atol=1e-5, rtol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_composes_with_tidaldecode():
    """A skipped selection layer: the sparse layers above read the last selection that ran. Skipping
    layer 2 (re-selection) must equal TidalDecode selecting at layer 1 only, with layer 2 skipped."""
    model = tokenpass.tiny("llama")
    graphs = capture(model)
    skip = SkipDecode(min_layers=3, max_layers=3, warmup=2)
    tidal = dict(top_k=3, sparse_start=1, sparse_selection_output=False)
    both = optimize_graphs(fork(graphs), [skip, tokenpass.TidalDecode(selection_layers=[1, 2], **tidal)])
    assert report(both).counts["carried_values"] == 1
    single = optimize_graphs(fork(graphs), [tokenpass.TidalDecode(selection_layers=[1], **tidal), skip])
    ids, mask = sequence(model.config.vocab_size)
    with torch.no_grad():
        got, _ = teacher_forced(both, ids, mask, PROMPT)
        want, _ = teacher_forced(single, ids, mask, PROMPT)
    torch.testing.assert_close(got, want)


def test_refuses_skipping_the_only_selection_layer():
    """Negative: a skippable layer hands later layers a value no earlier layer computes: refused, named."""
    model = tokenpass.tiny("llama")
    tidal = tokenpass.TidalDecode(top_k=3, sparse_start=1, selection_layers=[1])
    with pytest.raises(PassError, match=r"layer 1 .*cross-layer value.*raise warmup above 1"):
        tokenpass.optimize(model, [tidal, SkipDecode(min_layers=3, max_layers=3, warmup=1)])


def test_refuses_unlowered_graphs_and_trains_only_with_start():
    model = tokenpass.tiny("llama")
    with pytest.raises(PassError, match="not lowered onto the runtime cache"):
        tokenpass.optimize(model, ["skipdecode"], lower=False)
    with pytest.raises(PassError, match="training step has no prompt: set start"):
        tokenpass.optimize(model, [SkipDecode(min_layers=2, warmup=1)], phases=["train"])


@pytest.mark.parametrize("options, message", [
    (dict(min_layers=5, max_layers=3), "min_layers=5 exceeds max_layers=3"),
    (dict(min_layers=2, warmup=2), "warmup=2 must be below min_layers=2"),
    (dict(min_layers=0), "min_layers must be >= 1"),
    (dict(min_layers=3, warmup=-1), "warmup must be >= 0"),
    (dict(min_layers=3, max_length=0), "max_length must be >= 1"),
    (dict(min_layers=3, start=-2), "start must be >= 0"),
])
def test_bad_options(options, message):
    with pytest.raises(PassError, match=message):
        SkipDecode(**options)


def test_layers_out_of_range_fail_before_capture():
    model = tokenpass.tiny("llama")
    with pytest.raises(PassError, match="max_layers=9 is out of range \\(the model has 4 layers\\)"):
        tokenpass.optimize(model, [SkipDecode(min_layers=2, max_layers=9, warmup=1)])


def test_finetune_trains_saves_and_loads(tmp_path):
    model = tokenpass.tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = torch.randint(3, 300, (2000,), generator=torch.Generator().manual_seed(0))
    seen = []
    result = tokenpass.finetune(model, [SkipDecode(min_layers=2, warmup=1)], text, steps=4, batch=2, seq_len=32,
                                lr=1e-3, save=tmp_path / "ft", evaluate=lambda step: seen.append(step) or {},
                                evaluate_every=2)
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert seen == [0, 2, 4] and [e["step"] for e in result.evaluations] == [0, 2, 4]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    loaded = tokenpass.load(str(tmp_path / "ft"))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(TokenpassError, match="seq_len=64"):
        tokenpass.finetune(model, ["skipdecode"], text[:50], steps=1, seq_len=64)
    with pytest.raises(TokenpassError, match="does not rewrite the training step"):
        tokenpass.finetune(model, ["tidaldecode"], text, steps=1, seq_len=32)
    with pytest.raises(TokenpassError, match="lr_end must be in \\[0, lr=0.001\\]"):
        tokenpass.finetune(model, ["skipdecode"], text, steps=1, seq_len=32, lr=1e-3, lr_end=2e-3)


def test_finetune_learning_rate_decays_linearly_to_lr_end():
    text = torch.randint(3, 300, (500,), generator=torch.Generator().manual_seed(0))
    result = tokenpass.finetune(tokenpass.tiny("llama"), [SkipDecode(min_layers=2, warmup=1)], text, steps=4,
                                batch=1, seq_len=16, lr=1e-3, lr_end=2e-4)
    assert result.learning_rates == pytest.approx([1e-3, 8e-4, 6e-4, 4e-4])


def test_smollm2_gated_but_unskipped_is_exact_and_skipping_needs_finetuning(smollm2_optimized):
    """The real model: gated layers the schedule keeps running give dense greedy tokens exactly; a quarter
    of the layers skipped without fine-tuning costs perplexity badly (why ``tokenpass.finetune`` exists);
    two middle layers skipped stay within a bound."""
    from tokenpass.bench import compare
    from tokenpass.bench import teacher_forced as bench_forced
    from tokenpass.models import load_tokenizer
    from tokenpass.texts import read_text, token_ids

    graphs = smollm2_optimized.graphs
    ids = torch.tensor(token_ids(load_tokenizer(), read_text(), 192)).view(1, -1)
    unskipped = optimize_graphs(fork(graphs), [SkipDecode(min_layers=22, warmup=2, max_length=10**5)])
    assert report(unskipped).counts["gated_layers"] == 8
    prompt = ids[:, :64]
    dense = smollm2_optimized.generate(prompt, max_new_tokens=16)
    assert torch.equal(unskipped.generate(prompt, max_new_tokens=16), dense)
    skipping = optimize_graphs(fork(graphs), [SkipDecode(min_layers=22, max_layers=22, warmup=2)])
    dense_run = bench_forced(smollm2_optimized, ids[:, :128], ids[0, 128:], "dense")
    figures = compare(bench_forced(skipping, ids[:, :128], ids[0, 128:], "skip"), dense_run, ids[0, 128:], 128)
    assert figures["ppl_ratio"] > 3 and figures["top1_agreement"] < 0.8, figures
    # Quality bound on real text: two middle layers (6, 7) skipped costs little even untrained (measured:
    # ppl ratio 1.23, top-1 0.84; docs/benchmarks.md)
    light = optimize_graphs(fork(graphs), [SkipDecode(min_layers=28, max_layers=28, warmup=6)])
    figures = compare(bench_forced(light, ids[:, :128], ids[0, 128:], "light"), dense_run, ids[0, 128:], 128)
    assert figures["ppl_ratio"] < 1.35 and figures["top1_agreement"] > 0.75, figures


def test_finetune_distills_towards_a_teacher():
    """With ``teacher``, the first step's loss is KL(teacher || the masked model) on the sampled window."""
    import copy

    import torch.nn.functional as F

    model = tokenpass.tiny("llama")
    teacher = copy.deepcopy(model)
    p = SkipDecode(min_layers=2, warmup=1)
    text = torch.randint(3, 300, (500,), generator=torch.Generator().manual_seed(0))
    offsets = torch.randint(0, len(text) - 32 + 1, (2,), generator=torch.Generator().manual_seed(0))
    window = torch.stack([text[o : o + 32] for o in offsets.tolist()])
    trained_schedule = SkipDecode(min_layers=2, warmup=1, start=8, max_length=31).schedule(4)
    student = reference_logits(model, trained_schedule, 8, window, torch.ones_like(window))
    with torch.no_grad():
        target = teacher(input_ids=window).logits
    expected = F.kl_div(student.log_softmax(-1).flatten(0, 1), target.log_softmax(-1).flatten(0, 1),
                        log_target=True, reduction="batchmean")
    result = tokenpass.finetune(model, [p], text, steps=1, batch=2, seq_len=32, teacher=teacher)
    assert expected > 1e-4
    assert result.losses[0] == pytest.approx(expected.item(), rel=1e-4)


def test_compiled_steps_equal_eager():
    """``compile=True``: the gate becomes ``torch.cond`` in one compiled graph and generates eager's tokens."""
    model = tokenpass.tiny("llama")
    p = SkipDecode(min_layers=2, warmup=1, max_length=PROMPT + 4)
    ids, mask = padded_batch(model.config.vocab_size, length=PROMPT)
    eager = tokenpass.optimize(model, [p]).generate(ids, mask, max_new_tokens=8)
    compiled = tokenpass.optimize(model, [p], compile=True)
    assert torch.equal(compiled.generate(ids, mask, max_new_tokens=8), eager)
    decode = next(e for e in compiled.compile_report.entries if e.bucket.phase == "decode")
    assert decode.graphs == 1


def test_schedule_survives_kv_eviction(captured_llama):
    """With a KV budget below the prompt (recent-window eviction after every step), the gate keeps counting
    positions in the sequence, not slots left in the cache: its decisions are the schedule's, and the debug
    invariant holds (evicted slots go from every layer alike)."""
    from tokenpass.methods.skipdecode.runtime import GATE_CALLS, GATE_RUNS

    model, graphs = captured_llama
    p = SkipDecode(min_layers=2, max_layers=4, warmup=1, max_length=PROMPT + 4, debug=True)
    optimized = optimize_graphs(fork(graphs), [p])
    ids, mask = padded_batch(model.config.vocab_size, length=PROMPT)
    session = optimized.session(2, capacity=PROMPT + NEW, budget=6)
    positions = positions_from_mask(mask)
    with torch.no_grad():
        logits = session.step(ids, mask, positions)
        for step in range(NEW - 1):
            token = logits[:, -1:].argmax(-1)
            positions = positions[:, -1:] + 1
            logits = session.step(token, torch.ones_like(token), positions)
    assert session.cache.length == 6 and session.cache.sequence_length == PROMPT + NEW - 1
    plan = p.schedule(4)
    expected = sum(plan.runs(layer, slot, PROMPT) for layer in (1, 2) for slot in range(PROMPT, PROMPT + NEW - 1))
    assert session.cache.notes[GATE_CALLS] == 2 * (NEW - 1) and session.cache.notes[GATE_RUNS] == expected
