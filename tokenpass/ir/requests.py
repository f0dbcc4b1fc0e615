"""What a rewritten graph asks of the runtime, as plain data: per-slot cache state and run-time policies.

A method pass cannot hand the runtime a function (graphs are saved, inspected and exported), so it
*declares* what it needs on the graph, and the runtime builds it from its own registries:

* ``SlotState``: a tensor the KV cache keeps beside each layer's keys and values, one entry per slot
  (e.g. a channel-major copy of the keys to rank with, or accumulated attention scores to evict by).
  The cache allocates, stages, grows, compacts and rewinds it without knowing what it means.
* ``PolicySpec``: what the runtime does between steps (re-encode every n steps, evict after a step),
  named by a registered policy and its options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tokenpass.errors import TokenpassError

SLOT_SOURCES = (None, "keys", "values")
LAYOUTS = ("slot_major", "channel_major")


@dataclass(frozen=True)
class SlotState:
    """A per-slot tensor of some layers of the cache.

    Shape per layer: ``[B, H_kv, S, *trailing]`` (``slot_major``) or ``[B, H_kv, *trailing, S]``
    (``channel_major``: each channel's values over the slots are contiguous, so reading a few channels
    of every slot reads whole rows). ``source`` = ``"keys"``/``"values"``: every staged slot gets a copy
    of its new keys/values (converted to ``dtype``; ``trailing`` must then be ``(head_dim,)``); ``None``:
    new slots are filled with ``fill`` and the method's ops write the state themselves. ``dtype`` None
    means the cache's own dtype.
    """

    name: str
    layers: tuple[int, ...]
    trailing: tuple[int, ...] = ()
    dtype: str | None = None
    layout: Literal["slot_major", "channel_major"] = "slot_major"
    source: Literal["keys", "values"] | None = None
    fill: float = 0.0

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise TokenpassError(f"slot state {self.name!r}: layout {self.layout!r} is not one of {LAYOUTS}")
        if self.source not in SLOT_SOURCES:
            raise TokenpassError(f"slot state {self.name!r}: source {self.source!r} is not one of {SLOT_SOURCES}")
        if self.dtype is not None and not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise TokenpassError(f"slot state {self.name!r}: dtype {self.dtype!r} is not a torch dtype name")

    def torch_dtype(self, cache_dtype: torch.dtype) -> torch.dtype:
        return cache_dtype if self.dtype is None else getattr(torch, self.dtype)

    @property
    def slot_axis(self) -> int:
        """The slot axis of a layer's tensor (2, or the last axis for channel-major states)."""
        return 2 if self.layout == "slot_major" else 2 + len(self.trailing)


@dataclass(frozen=True)
class PolicySpec:
    """A run-time policy by registered name, with its options (hashable, printable, serialisable)."""

    name: str
    options: tuple[tuple[str, object], ...] = ()

    @classmethod
    def of(cls, name: str, **options: object) -> "PolicySpec":
        return cls(name, tuple(sorted(options.items())))

    def kwargs(self) -> dict[str, object]:
        return dict(self.options)


def merge_slot_states(declared: list[SlotState]) -> dict[str, SlotState]:
    """One declaration per name; the prefill and decode graphs may both declare the same state."""
    merged: dict[str, SlotState] = {}
    for state in declared:
        if state.name in merged and merged[state.name] != state:
            raise TokenpassError(f"slot state {state.name!r} is declared twice differently: {merged[state.name]} vs {state}")
        merged[state.name] = state
    return merged
