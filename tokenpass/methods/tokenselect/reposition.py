"""Contiguous re-positioning, the TokenSelect paper's position convention: the keys a step reads are
rotated again so that they sit at consecutive positions ``0 .. n-1`` and the query at ``n-1``, whatever
positions they were written at. Distances between query and key then never exceed the number of keys
read, however long the context: the paper's length-extrapolation argument (a model only meets
distances it was trained on).

The cache keeps keys rotated at their original positions (what the graph computed). RoPE rotations
compose additively and a score depends only on query position minus key position, so a key written at
``p`` that should sit at rank ``c`` below a query moved from ``t`` to ``n-1`` needs one more rotation
by ``d = (c - p) + (t - (n - 1))``: only the few keys read are rotated, the query is left alone, and
the step's own key (``p = t``, ``c = n-1``) is not moved.
"""

from __future__ import annotations

import torch

from tokenpass.runtime.ops import attend_cache, count_read


def attend_repositioned(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None,
                        slots: torch.Tensor, positions: torch.Tensor, query_position: torch.Tensor,
                        inv_freq: torch.Tensor, rot_dim: int, scale: float, softcap: float | None) -> torch.Tensor:
    """Attention over ``slots`` ``[B, k]`` (one choice for all heads) plus the step's own (last) slot,
    keys re-rotated to their rank among the live keys read. ``valid`` ``[B, S]``: slots that may be
    read (None: all); ``positions`` ``[B, S]``: each slot's original position; ``query_position`` ``[B]``."""
    batch, heads, length, dim = keys.shape
    index = torch.cat([slots, slots.new_full((batch, 1), length - 1)], dim=1)  # [B, k+1]
    rows = index[:, None, :, None].expand(-1, heads, -1, dim)
    picked_keys, picked_values = keys.gather(2, rows), values.gather(2, rows)
    count_read(picked_keys, picked_values)
    live = torch.ones_like(index, dtype=torch.bool) if valid is None else valid.gather(1, index)
    live[:, -1] = True
    shift = contiguous_shift(positions.gather(1, index), live, query_position)
    moved = rotate(picked_keys, shift, inv_freq, rot_dim)
    mask = None if valid is None else live[:, None, :].expand(-1, heads, -1)
    return attend_cache(query, moved, picked_values, mask, scale, softcap)


def contiguous_shift(original: torch.Tensor, live: torch.Tensor, query_position: torch.Tensor) -> torch.Tensor:
    """The extra rotation ``(rank - p) + (t - (n - 1))`` per key read (``[B, k]``; 0 where not live),
    ``rank`` the key's place among the row's ``n`` live keys ordered by original position ``p``."""
    order = original.masked_fill(~live, torch.iinfo(original.dtype).max).argsort(dim=1)
    ranks = torch.arange(original.shape[1], device=original.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    last = live.sum(dim=1, keepdim=True) - 1
    return (rank - original + (query_position[:, None] - last)).masked_fill(~live, 0)


def rotate(x: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor, rot_dim: int) -> torch.Tensor:
    """Rotate keys ``x`` ``[B, H, k, D]`` by ``shift`` ``[B, k]`` positions, half-split (``rotate_half``)
    on the first ``rot_dim`` dims as the graph's own embedding did; fp32 arithmetic."""
    half = rot_dim // 2
    angle = shift[:, None, :, None].float() * inv_freq.float().to(x.device)  # [B, 1, k, half]
    cos, sin = angle.cos(), angle.sin()
    first, second = x[..., :half].float(), x[..., half:rot_dim].float()
    turned = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(x.dtype)
    return torch.cat([turned, x[..., rot_dim:]], dim=-1) if rot_dim < x.shape[-1] else turned
