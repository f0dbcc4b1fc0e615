"""TokenSelect's CPU decode step for one unpadded sequence, in as few torch ops as the maths allows.

On two CPU cores a decode step at 8000 tokens spends about as much in per-op overhead (dispatch, small
index tensors, host syncs) as in the vote's one pass over K, and dense attention is a single fused SDPA
call. So this path does only: the vote (one matmul, softmax, head sum), one top-k, one index of the
slots read (first ``n_init``, the selected, the last ``n_local`` with the step's own), one row index for
every KV head, two row gathers and one SDPA. It applies where slot ``j`` holds position ``j`` (the
caller checks), there is no soft-cap and nothing is re-positioned; the general path covers the rest
and both are tested against the same step-by-step reference.
"""

from __future__ import annotations

import torch

from tokenpass.kernels.sparse_attention_ref import cache_rows
from tokenpass.runtime.ops import count_read

_RANGE = "tokenselect.range"  # cache note: arange over the cache's slots, sliced instead of rebuilt per layer


def one_sequence_attention(notes: dict, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           selected: torch.Tensor, n_init: int, n_local: int, scale: float) -> torch.Tensor:
    """Attention of one sequence's ``query`` ``[1, Hq, 1, D]`` over its first ``n_init`` slots, the
    ``selected`` ones ``[top_k]`` and its last ``n_local`` (own slot included)."""
    heads, length, dim = keys.shape[1], keys.shape[2], keys.shape[3]
    slots = _slot_range(notes, length)
    index = torch.cat([slots[:n_init], selected, slots[length - n_local :]])
    rows_k, rows_v = cache_rows(keys), cache_rows(values)
    head_step = keys.stride(1) // dim
    flat = (index + slots[:heads, None] * head_step).view(-1) if heads > 1 else index
    picked_keys = rows_k.index_select(0, flat).view(1, heads, -1, dim)
    picked_values = rows_v.index_select(0, flat).view(1, heads, -1, dim)
    count_read(picked_keys, picked_values)
    hq = query.shape[1]
    grouped = query.view(1, heads, hq // heads, dim)  # a KV head's query heads as rows over its keys
    out = torch.nn.functional.scaled_dot_product_attention(grouped, picked_keys, picked_values, scale=scale)
    return out.view(1, hq, 1, dim)


def has_row_layout(keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Both caches are ``[1, H, S, D]`` views whose rows are contiguous with one head stride (the runtime's
    buffers are), so a slot of a head is one row of the underlying storage."""
    dim = keys.shape[-1]
    return keys.shape[0] == 1 and keys.stride()[1:] == values.stride()[1:] and keys.stride(3) == 1 \
        and keys.stride(2) == dim and keys.stride(1) % dim == 0


def _slot_range(notes: dict, length: int) -> torch.Tensor:
    cached = notes.get(_RANGE)
    if cached is None or cached.shape[0] < length:
        cached = notes[_RANGE] = torch.arange(max(length * 2, 1024))
    return cached[:length]
