import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenpass.errors import TokenpassError
from tokenpass.ir.requests import SlotState
from tokenpass.runtime.generate import positions_from_mask
from tokenpass.runtime.kv_cache import KVCache, check_budget


def _step(cache, layer_kv, positions, valid):
    cache.begin_step(positions, valid)
    for layer, (k, v) in enumerate(layer_kv):
        cache.stage(layer, k, v)
    cache.commit()


def _kv(batch, heads, tokens, dim, fill):
    return torch.full((batch, heads, tokens, dim), float(fill)), torch.full((batch, heads, tokens, dim), -float(fill))


def test_append_records_positions_validity_and_grows():
    cache = KVCache(num_layers=2, batch=2, num_kv_heads=3, head_dim=4, capacity=4)
    positions = torch.tensor([[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
    valid = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # row 0 left-padded by two
    _step(cache, [_kv(2, 3, 5, 4, 1), _kv(2, 3, 5, 4, 2)], positions, valid)
    _step(cache, [_kv(2, 3, 1, 4, 3), _kv(2, 3, 1, 4, 4)], torch.tensor([[3], [5]]), torch.ones(2, 1))
    layer = cache.layers[1]
    assert cache.length == 6 and layer.capacity >= 6
    assert layer.positions[0, 2].tolist()[:6] == [1, 1, 0, 1, 2, 3]
    assert layer.valid[0, 0, :6].tolist() == [False, False, True, True, True, True]
    assert layer.valid[1].all() or layer.valid[1, :, :6].all()
    assert torch.equal(layer.keys[:, :, 5], torch.full((2, 3, 4), 4.0))
    assert cache.live_tokens() == 2 * 3 * (4 + 6)
    assert not cache.all_valid


def test_keep_compacts_per_head_and_really_frees_memory():
    cache = KVCache(num_layers=1, batch=1, num_kv_heads=2, head_dim=8, capacity=64)
    k = torch.arange(1000, dtype=torch.float32).view(1, 1, 1000, 1).expand(1, 2, 1000, 8).contiguous()
    _step(cache, [(k, -k)], torch.arange(1000)[None], torch.ones(1, 1000))
    before = cache.nbytes()
    slots = torch.tensor([[[0, 1, 998, 999], [5, 6, 7, 999]]])  # each head keeps its own tokens
    cache.keep(0, slots)
    layer = cache.layers[0]
    assert cache.length == 4 and cache.nbytes() < before / 10
    assert layer.keys[0, 1, :4, 0].tolist() == [5.0, 6.0, 7.0, 999.0]
    assert layer.positions[0, 0, :4].tolist() == [0, 1, 998, 999]  # original positions kept
    _step(cache, [_kv(1, 2, 1, 8, 7)], torch.tensor([[1000]]), torch.ones(1, 1))
    assert cache.length == 5 and cache.layers[0].keys[0, 0, 4, 0].item() == 7.0


def test_gather_reads_a_subset_without_changing_the_cache():
    cache = KVCache(num_layers=1, batch=1, num_kv_heads=1, head_dim=2)
    k = torch.arange(10, dtype=torch.float32).view(1, 1, 10, 1).expand(1, 1, 10, 2)
    _step(cache, [(k, k)], torch.arange(10)[None], torch.ones(1, 10))
    keys, values, valid = cache.gather(0, torch.tensor([[[9, 3]]]))
    assert keys[0, 0, :, 0].tolist() == [9.0, 3.0] and valid.all() and cache.length == 10


@pytest.mark.parametrize("budget,message", [(0, "positive"), (-3, "positive"), (10_000, "exceeds the model's context")])
def test_bad_budgets_are_clear_errors(budget, message):
    with pytest.raises(TokenpassError, match=message):
        check_budget(budget, max_positions=8192)
    assert check_budget(512, 8192) == 512


def test_budget_keeps_a_recent_window_and_bounds_memory():
    cache = KVCache(num_layers=2, batch=1, num_kv_heads=1, head_dim=2, capacity=8, budget=5, max_positions=100)
    for i in range(9):
        k = torch.full((1, 1, 1, 2), float(i))
        _step(cache, [(k, k), (k, k)], torch.tensor([[i]]), torch.ones(1, 1))
        cache.enforce_budget()
    assert cache.length == 5
    assert cache.layers[1].positions[0, 0, :5].tolist() == [4, 5, 6, 7, 8]
    assert cache.layers[0].keys[0, 0, :5, 0].tolist() == [4.0, 5.0, 6.0, 7.0, 8.0]


@pytest.fixture(scope="module")
def tiny_llama():
    """The tiny llama and its default (lowered) optimisation, shared: capturing costs seconds."""
    import tokenpass

    model = tokenpass.tiny("llama")
    return model, tokenpass.optimize(model)


def test_generate_with_a_budget_above_the_length_is_exact_and_bad_budgets_are_errors(tiny_llama):
    _, optimized = tiny_llama
    ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    full = optimized.generate(ids, max_new_tokens=5)
    assert torch.equal(optimized.generate(ids, max_new_tokens=5, kv_budget=64), full)  # nothing to evict
    for budget, message in [(0, "positive"), (-1, "positive"), (10_000, "exceeds the model's context")]:
        with pytest.raises(TokenpassError, match=message):
            optimized.generate(ids, max_new_tokens=2, kv_budget=budget)


def recent_window_mask(attention_mask: torch.Tensor, prompt_len: int, budget: int) -> torch.Tensor:
    """``[B, 1, T, T]`` boolean mask (True: attend) of what each token sees under a KV budget.

    The runtime evicts *after* each step (``run_step``: commit, then ``enforce_budget``), so the prompt,
    run in one prefill step before any eviction, sees the whole causal prompt, and the token at index
    ``q >= prompt_len`` (a decode step) sees the ``budget`` slots the previous step left, indices
    ``q - budget .. q - 1``, plus itself. Padding is never seen; every token sees itself, so padding rows
    have no empty softmax (a NaN there would reach real rows through 0 * NaN).
    """
    length = attention_mask.shape[1]
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = (k <= q) & ((q < prompt_len) | (k >= q - budget))
    allowed = (allowed[None] & attention_mask.bool()[:, None, :]) | torch.eye(length, dtype=torch.bool)[None]
    return allowed[:, None]


def _extend_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """The prompt's mask followed by ones for the generated tokens, ``length`` columns in all."""
    return torch.cat([mask, mask.new_ones(mask.shape[0], length - mask.shape[1])], dim=1)


def masked_reference_greedy(model, ids, mask, budget: int, new_tokens: int):
    """Greedy tokens ``[B, P + new]`` and each step's last logits ``[B, new, V]`` from the HF model alone:
    every step recomputed from scratch over the whole sequence under ``recent_window_mask`` (no cache)."""
    tokens, logits = ids, []
    for _ in range(new_tokens):
        full = _extend_mask(mask, tokens.shape[1])
        with torch.no_grad():
            out = model(input_ids=tokens, attention_mask=recent_window_mask(full, ids.shape[1], budget),
                        position_ids=positions_from_mask(full)).logits[:, -1]
        logits.append(out)
        tokens = torch.cat([tokens, out.argmax(-1, keepdim=True)], dim=1)
    return tokens, torch.stack(logits, 1)


def run_on_runtime_cache(optimized, tokens, mask, budget: int | None):
    """Teacher-force ``tokens`` through a ``Session``: prefill the prompt (``mask``'s width), then
    one decode step per later token, as ``generate`` does. Returns the cache, each step's last logits
    ``[B, steps, V]`` and, after each step, the cache's bytes and per-layer (positions, valid, keys, values)
    of its committed slots."""
    prompt_len, batch = mask.shape[1], tokens.shape[0]
    positions = positions_from_mask(_extend_mask(mask, tokens.shape[1]))
    session = optimized.session(batch, tokens.shape[1], budget)
    cache = session.cache
    logits, snapshots = [], []
    starts = [0, *range(prompt_len, tokens.shape[1] - 1)]
    ends = [prompt_len, *range(prompt_len + 1, tokens.shape[1])]
    for start, end in zip(starts, ends):
        valid = mask if start == 0 else torch.ones((batch, 1), dtype=torch.long)
        out = session.step(tokens[:, start:end], valid, positions[:, start:end], last_only=True)
        logits.append(out[:, -1])
        layers = [tuple(t[:, :, : layer.length].clone() for t in (layer.positions, layer.valid, layer.keys, layer.values))
                  for layer in cache.layers]
        snapshots.append((cache.nbytes(), layers))
    return cache, torch.stack(logits, 1), snapshots


def test_generate_with_a_budget_keeps_the_recent_window_bounds_memory_and_matches_a_masked_reference(tiny_llama):
    """``kv_budget=n`` keeps exactly the last ``n`` positions of every sequence, layer and head after
    every step, holds the same bytes however long the sequence grows (and fewer than the full cache), and
    generates what the HF model generates when attention is masked to that window (``recent_window_mask``).
    Two controls show the comparison can fail: full attention, and a window one token narrower, both give
    other logits. The prompt is longer than ``n`` plus the cache's 64 slots of headroom, or the budgeted
    cache would not be the smaller; row 0 is left-padded.
    """
    model, optimized = tiny_llama
    budget, new_tokens, prompt_len = 8, 8, 96
    ids = torch.randint(3, 300, (2, prompt_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    want, want_logits = masked_reference_greedy(model, ids, mask, budget, new_tokens)

    # (c) output: generate itself, and every step's logits on the runtime cache, against the reference.
    assert torch.equal(optimized.generate(ids, mask, max_new_tokens=new_tokens, kv_budget=budget), want)
    cache, logits, snapshots = run_on_runtime_cache(optimized, want, mask, budget)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-4)
    full_cache, full_logits, full_snapshots = run_on_runtime_cache(optimized, want, mask, None)
    assert (full_logits[:, 1:] - want_logits[:, 1:]).abs().max() > 1e-2  # the budget changes the output
    _, narrower = masked_reference_greedy(model, ids, mask, budget - 1, new_tokens)
    assert (narrower[:, 1:] - logits[:, 1:]).abs().max() > 1e-2  # the window's width is pinned exactly

    # (a) kept slots: the last `budget` positions of each row, in order, all live, in every layer and head.
    positions = positions_from_mask(_extend_mask(mask, want.shape[1]))
    heads = cache.layers[0].keys.shape[1]
    for step, (_, layers) in enumerate(snapshots):
        end = prompt_len + step
        expected = positions[:, None, end - budget : end].expand(-1, heads, -1)
        for kept_positions, kept_valid, _, _ in layers:
            assert torch.equal(kept_positions, expected), f"step {step}"
            assert kept_valid.all()
    assert cache.length == budget and cache.live_tokens() == len(cache.layers) * ids.shape[0] * heads * budget
    _, prefill_layers = full_snapshots[0]
    for (_, _, keys, values), (_, _, full_keys, full_values) in zip(snapshots[0][1], prefill_layers):
        assert torch.equal(keys, full_keys[:, :, -budget:]) and torch.equal(values, full_values[:, :, -budget:])

    # (b) memory: flat over the steps, below the unbudgeted cache, and independent of the prompt's length.
    sizes = {nbytes for nbytes, _ in snapshots}
    assert len(sizes) == 1 and sizes.pop() < full_cache.nbytes() == full_snapshots[-1][0]
    longer = torch.randint(3, 300, (2, 2 * prompt_len), generator=torch.Generator().manual_seed(1))
    long_cache, _, _ = run_on_runtime_cache(optimized, longer, torch.ones_like(longer), budget)
    assert long_cache.nbytes() == cache.nbytes() and long_cache.length == budget


def test_declared_slot_states_are_staged_grown_compacted_and_counted():
    """A channel-major bf16 key copy (staged from the keys) and a per-slot float score (written by ops)
    on layer 0 only: the cache handles both without knowing what they are."""
    copy = SlotState("copy", layers=(0,), trailing=(4,), dtype="bfloat16", layout="channel_major", source="keys")
    score = SlotState("score", layers=(0,), fill=-1.0)
    cache = KVCache(num_layers=2, batch=1, num_kv_heads=2, head_dim=4, capacity=4,
                    slot_states={"copy": copy, "score": score})
    plain = KVCache(num_layers=2, batch=1, num_kv_heads=2, head_dim=4, capacity=4)
    assert cache.nbytes() == plain.nbytes() + 1 * 2 * 4 * 4 * 2 + 1 * 2 * 4 * 4  # bf16 copy + fp32 score
    keys = torch.randn(1, 2, 6, 4)
    _step(cache, [(keys, keys), (keys, keys)], torch.arange(6)[None], torch.ones(1, 6))  # grows 4 -> 70 slots
    assert cache.layers[0].capacity > 4 and cache.state(0, "copy").shape == (1, 2, 4, cache.layers[0].capacity)
    assert torch.equal(cache.state(0, "copy")[..., :6], keys.transpose(-1, -2).bfloat16())
    assert torch.equal(cache.state(0, "score")[..., :6], torch.full((1, 2, 6), -1.0))
    cache.state(0, "score")[..., :6] = torch.arange(6.0)  # an op writes its scores
    new = torch.randn(1, 2, 1, 4)
    _step(cache, [(new, new), (new, new)], torch.tensor([[6]]), torch.ones(1, 1))
    assert torch.equal(cache.state(0, "copy")[..., 6], new[:, :, 0].bfloat16())  # staged with the keys
    cache.keep(0, torch.tensor([[[1, 6], [0, 3]]]))  # compaction carries states along
    assert torch.equal(cache.state(0, "copy")[0, 0, :, :2], torch.cat([keys[0, 0, 1:2], new[0, 0]]).T.bfloat16())
    assert torch.equal(cache.state(0, "score")[..., :2], torch.tensor([[[1.0, -1.0], [0.0, 3.0]]]))
    cache.rewind(1)
    _step(cache, [(keys[:, :, :1], keys[:, :, :1]), (keys[:, :, :1], keys[:, :, :1])], torch.tensor([[7]]), torch.ones(1, 1))
    assert torch.equal(cache.state(0, "copy")[..., 1], keys[:, :, 0].bfloat16())  # a rewound slot is re-staged
    with pytest.raises(TokenpassError, match="layer 1 of the KV cache keeps no state 'copy'"):
        cache.state(1, "copy")


def _live_entries(cache: KVCache, layer: int) -> list[list[set]]:
    """Per sequence and head: the set of (position, key value, value value, state) of live slots."""
    c = cache.layers[layer]
    state = c.states.get("score")
    return [[{(int(c.positions[b, h, i]), float(c.keys[b, h, i, 0]), float(c.values[b, h, i, 0]),
               None if state is None else float(state[b, h, i]))
              for i in range(c.length) if c.valid[b, h, i]} for h in range(c.keys.shape[1])]
            for b in range(c.keys.shape[0])]


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 3), length=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_retain_keeps_exactly_the_marked_live_slots_and_moves_few(batch, heads, length, seed):
    """``retain`` equals set semantics: the live slots afterwards are the marked live ones, with their
    positions, keys, values and states; the new length is the largest per-head count."""
    g = torch.Generator().manual_seed(seed)
    score = SlotState("score", layers=(0,))
    cache = KVCache(num_layers=1, batch=batch, num_kv_heads=heads, head_dim=2, capacity=4, slot_states={"score": score})
    k = torch.randn(batch, heads, length, 2, generator=g)
    valid = torch.rand(batch, length, generator=g) > 0.2
    _step(cache, [(k, -k)], torch.arange(length).expand(batch, length), valid)
    cache.state(0, "score")[..., :length] = torch.randn(batch, heads, length, generator=g)
    keep = torch.rand(batch, heads, length, generator=g) > 0.5
    before = _live_entries(cache, 0)
    want = [[{e for e in before[b][h] if keep[b, h, e[0]]} for h in range(heads)] for b in range(batch)]
    n = cache.retain(0, keep)
    assert n == max(len(w) for row in want for w in row) == cache.length
    assert _live_entries(cache, 0) == want
    assert not cache.layers[0].valid[:, :, n:].any()


def test_retain_of_one_slot_moves_one_and_shrinks_a_large_buffer():
    cache = KVCache(num_layers=1, batch=1, num_kv_heads=1, head_dim=2, capacity=1100)
    k = torch.arange(1000.0).view(1, 1, 1000, 1).expand(1, 1, 1000, 2).contiguous()
    _step(cache, [(k, k)], torch.arange(1000)[None], torch.ones(1, 1000))
    keep = torch.ones(1, 1, 1000, dtype=torch.bool)
    keep[0, 0, 10] = False
    before = cache.nbytes()
    assert cache.retain(0, keep) == 999
    layer = cache.layers[0]
    assert layer.keys[0, 0, 10, 0] == 999.0 and layer.positions[0, 0, 10] == 999  # the last slot filled the hole
    assert torch.equal(layer.keys[0, 0, 11:999, 0], torch.arange(11.0, 999.0))  # nothing else moved
    assert cache.nbytes() == before  # 999 + 64 slots would not be worth a reallocation ...
    cache.retain(0, torch.arange(999)[None, None] < 100)
    assert cache.length == 100 and cache.nbytes() < before / 5  # ... 100 are: memory is returned
    with pytest.raises(TokenpassError, match="keep mask of layer 0"):
        cache.retain(0, torch.ones(1, 1, 7, dtype=torch.bool))
