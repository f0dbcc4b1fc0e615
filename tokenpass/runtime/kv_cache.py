"""The KV cache the runtime owns: preallocated per-layer buffers, per sequence and per KV head.

Why not the graph's ``cat(past, new)``: that copies every layer's whole cache on every step. Here a step
*stages* its new keys/values into spare capacity (an O(new) write), attention reads a view of the
buffer, and the runtime *commits* the slots after the step. Each slot remembers the position its key
was encoded at and whether it is live, so eviction can drop tokens per head (with real compaction:
memory shrinks) while keys keep their original rotary positions.

Layout per layer: ``keys``/``values`` ``[B, H_kv, capacity, D]``, ``positions`` ``[B, H_kv, capacity]``
(int64, -1 when empty) and ``valid`` ``[B, H_kv, capacity]`` (bool: False for left padding, evicted
slots and unused capacity). All heads of a layer share one slot count ``length``; a head that keeps
fewer tokens marks the rest invalid.

Methods may declare per-slot *states* (``tokenpass.ir.requests.SlotState``): extra tensors with one
entry per slot, such as a channel-major copy of the keys to rank with, or accumulated attention scores
to evict by. The cache allocates them with the layer, writes their staged slots, carries them through
growth, compaction (``keep``) and rewinds, and counts their bytes, without knowing what they mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from tokenpass.errors import TokenpassError
from tokenpass.ir.requests import SlotState

_MIN_CAPACITY = 64


@dataclass
class LayerCache:
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    length: int = 0  # committed slots
    states: dict[str, torch.Tensor] = field(default_factory=dict)  # declared per-slot states

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def nbytes(self) -> int:
        buffers = (self.keys, self.values, self.positions, self.valid, *self.states.values())
        return sum(t.numel() * t.element_size() for t in buffers)


def _state_tensor(spec: SlotState, batch: int, heads: int, capacity: int, dtype, device) -> torch.Tensor:
    shape = (batch, heads, capacity, *spec.trailing) if spec.layout == "slot_major" else (batch, heads, *spec.trailing, capacity)
    return torch.full(shape, spec.fill, dtype=spec.torch_dtype(dtype), device=device)


def _empty_layer(batch: int, heads: int, capacity: int, head_dim: int, dtype, device,
                 states: tuple[SlotState, ...] = ()) -> LayerCache:
    return LayerCache(
        keys=torch.zeros((batch, heads, capacity, head_dim), dtype=dtype, device=device),
        values=torch.zeros((batch, heads, capacity, head_dim), dtype=dtype, device=device),
        positions=torch.full((batch, heads, capacity), -1, dtype=torch.long, device=device),
        valid=torch.zeros((batch, heads, capacity), dtype=torch.bool, device=device),
        states={spec.name: _state_tensor(spec, batch, heads, capacity, dtype, device) for spec in states},
    )


def _slots(tensor: torch.Tensor, axis: int, start: int, stop: int) -> torch.Tensor:
    """A view of slots ``start:stop`` along ``axis``."""
    return tensor.narrow(axis, start, stop - start)


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
        slot_states: Mapping[str, SlotState] | None = None,
    ):
        self.budget = None if budget is None else check_budget(budget, max_positions)
        if self.budget is not None:
            capacity = min(capacity, self.budget + _MIN_CAPACITY)
        self.slot_states = dict(slot_states or {})
        for spec in self.slot_states.values():
            bad = [layer for layer in spec.layers if not 0 <= layer < num_layers]
            if bad:
                raise TokenpassError(f"slot state {spec.name!r} names layer {bad[0]}; the cache has {num_layers} layers")
        self.layers = [
            _empty_layer(batch, num_kv_heads, capacity, head_dim, dtype, device, self._states_of(layer))
            for layer in range(num_layers)
        ]
        self.batch = batch
        self.step_positions: torch.Tensor | None = None  # [B, T] positions of the tokens being run
        self.step_valid: torch.Tensor | None = None  # [B, T] False for left padding
        self.all_valid = True  # no padding and no eviction so far: attention needs no mask in decode
        self.bytes_read = 0  # cache bytes the attention ops have read (their own accounting, all steps)
        # Plain per-session values a method's policy and ops share (where the prompt ended, which layers
        # ran at the last step): the cache is the one per-session object both reach. Keys are prefixed
        # with the method's name; the cache never reads them.
        self.notes: dict[str, object] = {}
        # Slots committed so far, evictions not subtracted: the index the next token takes in the (left-
        # padded) sequence, which eviction must not move (schedules keyed on it, reports).
        self.sequence_length = 0

    def _states_of(self, layer: int) -> tuple[SlotState, ...]:
        return tuple(spec for spec in self.slot_states.values() if layer in spec.layers)

    def _resized(self, index: int, capacity: int) -> LayerCache:
        """A copy of layer ``index`` with ``capacity`` slots (the first ``length`` slots carried over)."""
        layer = self.layers[index]
        b, h, _, d = layer.keys.shape
        new = _empty_layer(b, h, capacity, d, layer.keys.dtype, layer.keys.device, self._states_of(index))
        n = layer.length
        for name in ("keys", "values", "positions", "valid"):
            getattr(new, name)[:, :, :n] = getattr(layer, name)[:, :, :n]
        for spec in self._states_of(index):
            _slots(new.states[spec.name], spec.slot_axis, 0, n).copy_(_slots(layer.states[spec.name], spec.slot_axis, 0, n))
        new.length = n
        return new


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
            self.layers = [self._resized(index, capacity) for index in range(len(self.layers))]

    def stage(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> LayerCache:
        """Write the step's new ``[B, H, T, D]`` keys/values after the committed slots of ``layer``."""
        cache = self.layers[layer]
        start, t = cache.length, keys.shape[2]
        cache.keys[:, :, start : start + t] = keys
        cache.values[:, :, start : start + t] = values
        cache.positions[:, :, start : start + t] = self.step_positions[:, None, :]
        cache.valid[:, :, start : start + t] = self.step_valid[:, None, :]
        for spec in self._states_of(layer):
            self._stage_state(spec, cache.states[spec.name], start, keys, values)
        return cache

    @staticmethod
    def _stage_state(spec: SlotState, state: torch.Tensor, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write the staged slots of a declared state: a copy of the new keys/values, or its fill value."""
        target = _slots(state, spec.slot_axis, start, start + keys.shape[2])
        if spec.source is None:
            target.fill_(spec.fill)
            return
        source = keys if spec.source == "keys" else values
        target.copy_(source.transpose(-1, -2) if spec.layout == "channel_major" else source)

    def state(self, layer: int, name: str) -> torch.Tensor:
        """Layer ``layer``'s declared per-slot state ``name`` (all capacity; slots staged so far are written)."""
        states = self.layers[layer].states
        if name not in states:
            declared = ", ".join(sorted(self.slot_states)) or "none"
            raise TokenpassError(f"layer {layer} of the KV cache keeps no state {name!r} (declared: {declared})")
        return states[name]

    def commit(self) -> None:
        t = self.step_positions.shape[1]
        self.sequence_length += t
        for cache in self.layers:
            cache.length += t
        self.step_positions = self.step_valid = None

    def rewind(self, tokens: int) -> None:
        """Forget the last ``tokens`` committed slots of every layer (their next step overwrites them)."""
        if not 0 <= tokens <= self.length:
            raise TokenpassError(f"cannot rewind {tokens} tokens of a cache holding {self.length}")
        self.sequence_length -= tokens
        for cache in self.layers:
            cache.length -= tokens
            cache.valid[:, :, cache.length : cache.length + tokens] = False

    # --- eviction and selection -------------------------------------------------------------------
    def keep(self, layer: int, slots: torch.Tensor, shrink: bool = True) -> None:
        """Keep only ``slots`` ``[B, H, n]`` (slot indices, per sequence and head) of ``layer``, compacted.

        Kept slots move to the front in the given order, declared states with them. With ``shrink``, a
        layer whose capacity exceeds ``n`` plus headroom is reallocated so the memory is really returned;
        otherwise the slots are compacted in place (no allocation per eviction step).
        """
        cache = self.layers[layer]
        n = slots.shape[-1]
        index = slots.unsqueeze(-1).expand(-1, -1, -1, cache.keys.shape[-1])
        specs = self._states_of(layer)
        target = cache
        if shrink and n + _MIN_CAPACITY < cache.capacity:
            target = _empty_layer(*cache.keys.shape[:2], n + _MIN_CAPACITY, cache.keys.shape[-1], cache.keys.dtype,
                                  cache.keys.device, specs)
        kept = {"keys": cache.keys.gather(2, index), "values": cache.values.gather(2, index),
                "positions": cache.positions.gather(2, slots), "valid": cache.valid.gather(2, slots)}
        states = {spec.name: _gather_slots(cache.states[spec.name], spec, slots) for spec in specs}
        for name, tensor in kept.items():
            getattr(target, name)[:, :, :n] = tensor
        for spec in specs:
            _slots(target.states[spec.name], spec.slot_axis, 0, n).copy_(states[spec.name])
        target.valid[:, :, n:] = False
        target.positions[:, :, n:] = -1
        target.length = n
        self.layers[layer] = target
        self.all_valid = False

    def retain(self, layer: int, keep: torch.Tensor, shrink: bool = True) -> int:
        """Keep the slots ``keep`` marks (``[B, H, length]`` bool) of ``layer``; return its new length.

        Why not ``keep``: an eviction step that drops one slot would gather every kept slot, a copy as
        large as the attention read it saves. Here only kept slots beyond the new length move, each into
        a dropped slot's place, so evicting ``m`` slots moves at most ``m`` (slot order is not preserved;
        attention does not depend on it, and positions travel with the slots). Sequences and heads may
        keep different counts: the new length is the largest, and the others' leftover slots are dead.
        With ``shrink``, a buffer far larger than the new length is reallocated so memory is returned, with
        room for one more token: an evicting method holds its budget plus the step's token, no headroom.
        """
        cache = self.layers[layer]
        length = cache.length
        if keep.shape != (*cache.keys.shape[:2], length):
            raise TokenpassError(f"retain: the keep mask of layer {layer} is {tuple(keep.shape)}, expected "
                                 f"{(*cache.keys.shape[:2], length)}")
        keep = keep & cache.valid[:, :, :length]
        n = int(keep.sum(-1).max()) if keep.numel() else 0
        if n < length:
            self._fill_holes(layer, keep, n)
        cache.valid[:, :, :n] &= keep[:, :, :n]
        if n < length:
            cache.valid[:, :, n:] = False
            cache.positions[:, :, n:] = -1
            cache.length = n
            if shrink and n + max(_MIN_CAPACITY, n // 4) < cache.capacity:  # worth a copy (growth's margin)
                self.layers[layer] = self._resized(layer, n + 1)  # room for the next decode token
        self.all_valid = False
        return n

    def _fill_holes(self, layer: int, keep: torch.Tensor, n: int) -> None:
        """Move each kept slot at index >= ``n`` into a dropped slot below ``n`` (per sequence and head)."""
        cache = self.layers[layer]
        length = keep.shape[-1]
        index = torch.arange(length, device=keep.device).expand_as(keep)
        movers = keep & (index >= n)
        holes = ~keep & (index < n)
        moved = int(movers.sum(-1).max())
        if moved == 0:
            return
        spare = length - 1  # pairs past a head's own count copy this slot onto itself: it is dropped anyway
        # the ``moved`` first movers and holes of each head (a top-k of a few, not a sort of every slot)
        src = torch.where(movers, index, length + index).topk(moved, dim=-1, largest=False).values
        dst = torch.where(holes, index, length + index).topk(moved, dim=-1, largest=False).values
        real = src < length
        src, dst = src.where(real, spare), dst.where(real, spare)
        rows = src.unsqueeze(-1).expand(-1, -1, -1, cache.keys.shape[-1])
        into = dst.unsqueeze(-1).expand_as(rows)
        for name in ("keys", "values"):
            buffer = getattr(cache, name)
            buffer.scatter_(2, into, buffer.gather(2, rows))
        for name in ("positions", "valid"):
            buffer = getattr(cache, name)
            buffer.scatter_(2, dst, buffer.gather(2, src))
        for spec in self._states_of(layer):
            state = cache.states[spec.name]
            state.scatter_(spec.slot_axis, _slot_index(state, spec, dst), _gather_slots(state, spec, src))
        keep.scatter_(2, dst, keep.gather(2, src))  # the holes now hold kept slots

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


def _slot_index(state: torch.Tensor, spec: SlotState, slots: torch.Tensor) -> torch.Tensor:
    """``slots`` ``[B, H, n]`` expanded over ``state``'s trailing axes, for gather/scatter on its slot axis."""
    b, h, n = slots.shape
    if spec.layout == "slot_major":
        return slots.view(b, h, n, *([1] * len(spec.trailing))).expand(b, h, n, *spec.trailing)
    return slots.view(b, h, *([1] * len(spec.trailing)), n).expand(b, h, *spec.trailing, n)


def _gather_slots(state: torch.Tensor, spec: SlotState, slots: torch.Tensor) -> torch.Tensor:
    """``state``'s entries at ``slots`` ``[B, H, n]`` along its slot axis."""
    return state.gather(spec.slot_axis, _slot_index(state, spec, slots))


def check_budget(budget: int, max_positions: int | None) -> int:
    """Validate a KV budget (tokens kept per sequence and head) against the model."""
    if not isinstance(budget, int) or budget < 1:
        raise TokenpassError(f"KV budget must be a positive number of tokens, got {budget!r}")
    if max_positions is not None and budget > max_positions:
        raise TokenpassError(f"KV budget {budget} exceeds the model's context of {max_positions} positions")
    return budget
