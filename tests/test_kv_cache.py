import pytest
import torch

from tokenpass.errors import TokenpassError
from tokenpass.ir.requests import SlotState
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


def test_generate_with_a_budget_matches_a_recent_window_and_rejects_bad_budgets():
    import tokenpass

    model = tokenpass.tiny("llama")
    optimized = tokenpass.optimize(model)
    ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    full = optimized.generate(ids, max_new_tokens=5)
    assert torch.equal(optimized.generate(ids, max_new_tokens=5, kv_budget=64), full)  # budget above length: exact
    windowed = optimized.generate(ids, max_new_tokens=5, kv_budget=4)
    assert windowed.shape == full.shape
    for budget, message in [(0, "positive"), (-1, "positive"), (10_000, "exceeds the model's context")]:
        with pytest.raises(TokenpassError, match=message):
            optimized.generate(ids, max_new_tokens=2, kv_budget=budget)


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
