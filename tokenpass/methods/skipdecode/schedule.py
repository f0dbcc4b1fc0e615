"""SkipDecode's exit schedule: how many layers a token at each position runs, and which ones.

With ``L`` layers, a token at position ``p`` runs ``n(p)`` layers: the ``warmup`` bottom layers and the top
``n(p) - warmup`` layers; the layers between are skipped (identity on the residual stream). ``n`` decays
linearly from ``max_layers`` at ``start`` to ``min_layers`` at ``max_length`` and is clamped, so it never
increases along the sequence. That monotonicity is the KV invariant: for ``j < i`` the layers run at ``i``
are a subset of those run at ``j``, so every layer a token runs finds keys and values for all earlier
tokens, and nothing is recomputed (SkipDecode, arXiv 2307.02628, section 3).

Positions are cache slots (a left-padded batch shares them), so one exit point serves the whole batch at
each step, as the paper requires for batching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenpass.errors import PassError


@dataclass(frozen=True)
class LinearSchedule:
    """``n(p)``: ``max_layers`` up to ``start``, then linear down to ``min_layers`` at ``max_length``."""

    num_layers: int
    max_layers: int
    min_layers: int
    warmup: int
    max_length: int

    def __post_init__(self) -> None:
        check_schedule(self.num_layers, self.max_layers, self.min_layers, self.warmup, self.max_length)

    def depth(self, position: int, start: int) -> int:
        """Layers run by the token at ``position`` when the schedule starts at ``start`` (the prompt's end:
        prompt positions run every layer)."""
        if position < start:
            return self.num_layers
        fraction = min((position - start) / max(self.max_length - start, 1), 1.0)
        # ceil keeps n on or above the straight line: the token at ``start`` runs max_layers exactly
        return math.ceil(self.max_layers - fraction * (self.max_layers - self.min_layers) - 1e-9)

    def runs(self, layer: int, position: int, start: int) -> bool:
        """Whether ``layer`` runs for the token at ``position``: a warm-up layer or one of the top ones."""
        return layer < self.warmup or layer >= self.num_layers - (self.depth(position, start) - self.warmup)

    def skippable(self) -> range:
        """The layers some position may skip: those between the warm-up and the top ``min_layers - warmup``."""
        return range(self.warmup, self.num_layers - (self.min_layers - self.warmup))

    def mean_fraction(self, start: int, positions: range) -> float:
        """Mean fraction of layers run over ``positions`` (what decode speed should track)."""
        return sum(self.depth(p, start) for p in positions) / (len(positions) * self.num_layers)


def check_schedule(num_layers: int, max_layers: int, min_layers: int, warmup: int, max_length: int) -> None:
    """Refuse schedules that are empty, inverted or out of the model's range, naming the option."""
    if not 1 <= max_layers <= num_layers:
        raise PassError(f"skipdecode: max_layers={max_layers} is out of range (the model has {num_layers} layers)")
    if not 1 <= min_layers <= num_layers:
        raise PassError(f"skipdecode: min_layers={min_layers} is out of range (the model has {num_layers} layers)")
    check_options(max_layers, min_layers, warmup, max_length)


def check_options(max_layers: int | None, min_layers: int | None, warmup: int, max_length: int) -> None:
    """The checks that need no model (None: a bound resolved from the model later): order of the bounds,
    the warm-up, the schedule's length."""
    if warmup < 0:
        raise PassError(f"skipdecode: warmup must be >= 0, got {warmup}")
    if max_length < 1:
        raise PassError(f"skipdecode: max_length must be >= 1, got {max_length}")
    if min_layers is None:
        return
    if min_layers < 1:
        raise PassError(f"skipdecode: min_layers must be >= 1, got {min_layers}")
    if max_layers is not None and min_layers > max_layers:
        raise PassError(f"skipdecode: min_layers={min_layers} exceeds max_layers={max_layers}")
    if warmup >= min_layers:
        raise PassError(f"skipdecode: warmup={warmup} must be below min_layers={min_layers} "
                        f"(the top layers run at every depth, so at least one must remain above the warm-up)")
