"""The KV cache the runtime owns: preallocated per-layer buffers, per sequence and per KV head.

Why not the graph's ``cat(past, new)``: that copies every layer's whole cache on every step. Here a step
*stages* its new keys/values into spare capacity (an O(new) write), attention reads a view of the
buffer, and the runtime *commits* the slots after the step. Each slot remembers the position its key
was encoded at and whether it is live, so eviction can drop tokens per head (with real compaction:
memory shrinks) while keys keep their original rotary positions.

Layout per layer: ``keys``/``values`` ``[B, H_kv, capacity, D]``, ``positions`` ``[B, H_kv, capacity]``
(int64, -1 when empty) and ``valid`` ``[B, H_kv, capacity]`` (bool: False for left padding, evicted
slots and unused capacity). All heads of a layer share one slot count ``length``; a head that keeps
fewer tokens marks the rest invalid. A layer may also hold ``score_keys``: a channel-major
(``[B, H_kv, D, capacity]``) copy of its keys, optionally in a narrower dtype, that selection ops rank
with, so that ranking reads a few channels of every key as contiguous rows.
It is created on first request and written by every ``stage``; compaction and growth drop it and the
next request rebuilds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenpass.errors import TokenpassError

_MIN_CAPACITY = 64


@dataclass
class LayerCache:
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    length: int = 0  # committed slots
    score_keys: torch.Tensor | None = None  # ``keys`` for ranking, channel-major [B, H, D, capacity]

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def nbytes(self) -> int:
        buffers = (self.keys, self.values, self.positions, self.valid, self.score_keys)
        return sum(t.numel() * t.element_size() for t in buffers if t is not None)


def _empty_layer(batch: int, heads: int, capacity: int, head_dim: int, dtype, device) -> LayerCache:
    return LayerCache(
        keys=torch.zeros((batch, heads, capacity, head_dim), dtype=dtype, device=device),
        values=torch.zeros((batch, heads, capacity, head_dim), dtype=dtype, device=device),
        positions=torch.full((batch, heads, capacity), -1, dtype=torch.long, device=device),
        valid=torch.zeros((batch, heads, capacity), dtype=torch.bool, device=device),
    )


def _resized(layer: LayerCache, capacity: int) -> LayerCache:
    """A copy of ``layer`` with ``capacity`` slots (the first ``length`` slots carried over)."""
    b, h, _, d = layer.keys.shape
    new = _empty_layer(b, h, capacity, d, layer.keys.dtype, layer.keys.device)
    n = layer.length
    new.keys[:, :, :n] = layer.keys[:, :, :n]
    new.values[:, :, :n] = layer.values[:, :, :n]
    new.positions[:, :, :n] = layer.positions[:, :, :n]
    new.valid[:, :, :n] = layer.valid[:, :, :n]
    new.length = n
    return new


class KVCache:
    """All layers' caches for one batch, plus the description of the step being run."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity: int = _MIN_CAPACITY,
        budget: int | None = None,
        max_positions: int | None = None,
    ):
        self.budget = None if budget is None else check_budget(budget, max_positions)
        if self.budget is not None:
            capacity = min(capacity, self.budget + _MIN_CAPACITY)
        self.layers = [
            _empty_layer(batch, num_kv_heads, capacity, head_dim, dtype, device) for _ in range(num_layers)
        ]
        self.batch = batch
        self.step_positions: torch.Tensor | None = None  # [B, T] positions of the tokens being run
        self.step_valid: torch.Tensor | None = None  # [B, T] False for left padding
        self.all_valid = True  # no padding and no eviction so far: attention needs no mask in decode
        self.bytes_read = 0  # cache bytes the attention ops have read (their own accounting, all steps)

    # --- one step -------------------------------------------------------------------------------
    def begin_step(self, positions: torch.Tensor, token_valid: torch.Tensor) -> None:
        """Describe the ``T`` tokens the next forward step adds (their positions and which are real)."""
        self.step_positions, self.step_valid = positions, token_valid.bool()
        if not bool(self.step_valid.all()):
            self.all_valid = False
        needed = self.layers[0].length + positions.shape[1]
        if needed > self.layers[0].capacity:
            # Grow by a quarter (amortised O(1) appends without doubling a large cache's memory); callers
            # that know the final length reserve it up front instead.
            capacity = max(needed, self.layers[0].capacity + max(_MIN_CAPACITY, self.layers[0].capacity // 4))
            self.layers = [_resized(layer, capacity) for layer in self.layers]

    def stage(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> LayerCache:
        """Write the step's new ``[B, H, T, D]`` keys/values after the committed slots of ``layer``."""
        cache = self.layers[layer]
        start, t = cache.length, keys.shape[2]
        cache.keys[:, :, start : start + t] = keys
        cache.values[:, :, start : start + t] = values
        cache.positions[:, :, start : start + t] = self.step_positions[:, None, :]
        cache.valid[:, :, start : start + t] = self.step_valid[:, None, :]
        if cache.score_keys is not None:
            cache.score_keys[:, :, :, start : start + t] = keys.transpose(-1, -2)
        return cache

    def score_keys(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        """``layer``'s keys in ``dtype``, channel-major ``[B, H, D, capacity]`` (slots staged so far
        included), kept in step by ``stage``. Built on first request: one conversion per layer."""
        cache = self.layers[layer]
        if cache.score_keys is None or cache.score_keys.dtype != dtype:
            b, h, capacity, d = cache.keys.shape
            cache.score_keys = torch.empty((b, h, d, capacity), dtype=dtype, device=cache.keys.device)
            cache.score_keys.copy_(cache.keys.transpose(-1, -2))
        return cache.score_keys

    def commit(self) -> None:
        t = self.step_positions.shape[1]
        for cache in self.layers:
            cache.length += t
        self.step_positions = self.step_valid = None

    def rewind(self, tokens: int) -> None:
        """Forget the last ``tokens`` committed slots of every layer (their next step overwrites them)."""
        if not 0 <= tokens <= self.length:
            raise TokenpassError(f"cannot rewind {tokens} tokens of a cache holding {self.length}")
        for cache in self.layers:
            cache.length -= tokens
            cache.valid[:, :, cache.length : cache.length + tokens] = False

    # --- eviction and selection -------------------------------------------------------------------
    def keep(self, layer: int, slots: torch.Tensor, shrink: bool = True) -> None:
        """Keep only ``slots`` ``[B, H, n]`` (slot indices, per sequence and head) of ``layer``, compacted.

        Kept slots move to the front in the given order; ``shrink`` reallocates the buffers to ``n`` slots
        plus headroom so the memory is really returned.
        """
        cache = self.layers[layer]
        n = slots.shape[-1]
        index = slots.unsqueeze(-1).expand(-1, -1, -1, cache.keys.shape[-1])
        keys, values = cache.keys.gather(2, index), cache.values.gather(2, index)
        positions, valid = cache.positions.gather(2, slots), cache.valid.gather(2, slots)
        capacity = max(n + _MIN_CAPACITY, _MIN_CAPACITY) if shrink else cache.capacity
        new = _empty_layer(*keys.shape[:2], capacity, keys.shape[-1], keys.dtype, keys.device)
        new.keys[:, :, :n], new.values[:, :, :n] = keys, values
        new.positions[:, :, :n], new.valid[:, :, :n] = positions, valid
        new.length = n
        self.layers[layer] = new
        self.all_valid = False

    def enforce_budget(self) -> int:
        """Evict down to ``budget`` slots per sequence and head, keeping the most recent; returns how many
        slots each layer dropped. Eviction passes that score tokens call ``keep`` with their own choice
        before this runs; this is the fallback policy (a recent window)."""
        if self.budget is None or self.length <= self.budget:
            return 0
        dropped = self.length - self.budget
        b, h = self.layers[0].keys.shape[:2]
        recent = torch.arange(dropped, self.length, device=self.layers[0].keys.device).expand(b, h, self.budget)
        for layer in range(len(self.layers)):
            self.keep(layer, recent)
        return dropped

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and validity of ``slots`` ``[B, H, k]`` of ``layer`` (the cache is unchanged)."""
        cache = self.layers[layer]
        index = slots.unsqueeze(-1).expand(-1, -1, -1, cache.keys.shape[-1])
        return cache.keys.gather(2, index), cache.values.gather(2, index), cache.valid.gather(2, slots)

    # --- reporting --------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.layers[0].length

    def nbytes(self) -> int:
        """Bytes the cache's buffers occupy now (capacity included: that is what memory holds)."""
        return sum(layer.nbytes() for layer in self.layers)

    def live_tokens(self) -> int:
        """Live (valid) key slots summed over layers, sequences and heads."""
        return int(sum(int(layer.valid[:, :, : layer.length].sum()) for layer in self.layers))


def check_budget(budget: int, max_positions: int | None) -> int:
    """Validate a KV budget (tokens kept per sequence and head) against the model."""
    if not isinstance(budget, int) or budget < 1:
        raise TokenpassError(f"KV budget must be a positive number of tokens, got {budget!r}")
    if max_positions is not None and budget > max_positions:
        raise TokenpassError(f"KV budget {budget} exceeds the model's context of {max_positions} positions")
    return budget
