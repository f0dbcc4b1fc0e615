"""Exact torch reference of attention over a runtime KV cache (the CPU path and the kernels' oracle).

Besides plain causal attention it supports two per-layer model features: attention-logit soft-capping
(Gemma 2: ``s = softcap * tanh(s / softcap)`` after the scale, before masking and softmax) and sliding
windows (a query at position ``p`` sees a slot holding position ``q`` only if ``p - q < window``).
Positions are per slot because eviction can leave a head's slots out of position order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenpass.kernels.attention_ref import expand_kv_heads


def step_mask(
    valid: torch.Tensor | None, new_tokens: int, slots: int, device: torch.device | str | None = None
) -> torch.Tensor | None:
    """``[B, H_kv, T, S]`` visibility: a live slot, not after the query (the last ``T`` slots are the step's).

    Each query also sees its own slot, so a padding query never has an empty row (which would give NaN
    that leaks through ``0 * NaN`` into real rows). The mask is made on ``valid``'s device, else on
    ``device`` (the queries': a CPU mask cannot go with CUDA queries), else on CPU.
    """
    if valid is None and new_tokens == 1:
        return None
    query_slot = torch.arange(slots - new_tokens, slots, device=valid.device if valid is not None else device)
    slot = torch.arange(slots, device=query_slot.device)
    causal = slot[None, :] <= query_slot[:, None]  # [T, S]
    if valid is None:
        return causal[None, None]
    return (valid[:, :, None, :] & causal) | (slot[None, :] == query_slot[:, None])


def grouped_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``[B,Hq,T,D]`` queries over ``[B,Hkv,S,D]`` keys without repeating KV heads.

    The ``G`` query heads sharing a KV head are folded into the query axis, so SDPA reads each KV head
    once instead of materialising ``G`` copies (HF's ``repeat_kv``).
    """
    b, hq, t, d = query.shape
    hkv = keys.shape[1]
    group = hq // hkv
    q = query.reshape(b, hkv, group * t, d)
    if mask is not None:
        mask = mask[:, :, None].expand(b, mask.shape[1], group, t, mask.shape[-1]).reshape(b, -1, group * t, mask.shape[-1])
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, t, values.shape[-1])


UNFOLDED_DECODE_DTYPES = (torch.bfloat16, torch.float16)


def unfolded_decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Unmasked one-token attention in reduced precision: one query row per head, SDPA's own GQA.

    Why not fold the group as ``grouped_attention`` does: in bf16/fp16 SDPA's CPU kernel rounds a block
    of ``G`` query rows differently from ``G`` single rows (1 ulp in a few outputs), and later layers
    amplify that to logit differences of 0.2-0.5 on SmolLM2, enough to flip greedy near-ties. HF runs
    unmasked decode exactly like this (``enable_gqa=True``, which equals repeating the KV heads bit for
    bit), so reduced-precision decode matches it exactly; it is no slower than folding in bf16. fp32 keeps
    the fold (faster there, and differences stay at fp32 rounding level).
    """
    return F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True)


def check_softcap(softcap: float | None) -> None:
    """Reject a non-positive cap: ``tanh(s / 0)`` is NaN, and a negative cap flips the ranking of scores."""
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(scores / softcap)``: squashes scaled scores into ``(-softcap, softcap)``; None: as is."""
    if softcap is None:
        return scores
    return softcap * torch.tanh(scores / softcap)


def in_window(slot_positions: torch.Tensor, query_positions: torch.Tensor, window: int) -> torch.Tensor:
    """``[B, Hkv, T, S]``: slot ``j`` lies within query ``i``'s window (``p_i - q_j < window``).

    Only the distance back is checked here; causality (by slot order) and liveness are separate rules.
    """
    return (query_positions[:, None, :, None] - slot_positions[:, :, None, :]) < window


def window_valid(
    valid: torch.Tensor | None, slot_positions: torch.Tensor, query_positions: torch.Tensor, window: int
) -> torch.Tensor:
    """Decode's sliding window folded into slot validity: ``[B, Hkv, S]`` bool.

    With one query token every rule is per slot, so the window is just more dead slots and the decode
    kernels need no window support: the runtime passes this as their ``valid``. The last slot (the step's
    own token) stays visible, as ``step_mask`` makes it. ``query_positions`` is ``[B, 1]``.
    """
    if query_positions.shape[-1] != 1:
        raise ValueError(f"window_valid folds one query token per sequence, got {query_positions.shape[-1]}")
    live = in_window(slot_positions, query_positions, window)[:, :, 0]
    if valid is not None:
        live = live & valid
    live[..., -1] = True
    return live


def windowed_step_mask(
    valid: torch.Tensor | None, slot_positions: torch.Tensor, query_positions: torch.Tensor, window: int
) -> torch.Tensor:
    """``[B, H, T, S]`` visibility under a sliding window: ``step_mask``'s rules and ``in_window``.

    ``H`` is that of ``slot_positions`` (and ``valid``), so passing head 0 of both gives one mask shared
    by every head. Each query still sees its own slot (no empty row, hence no NaN, for padding queries).
    """
    t, s = query_positions.shape[-1], slot_positions.shape[-1]
    query_slot = torch.arange(s - t, s, device=slot_positions.device)
    slot = torch.arange(s, device=slot_positions.device)
    causal = slot[None, :] <= query_slot[:, None]  # [T, S]
    live = causal & in_window(slot_positions, query_positions, window)
    if valid is not None:
        live = live & valid[:, :, None, :]
    return live | (slot[None, :] == query_slot[:, None])


def softcapped_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float,
    softcap: float,
) -> torch.Tensor:
    """``[B,Hq,T,D]`` over ``[B,Hkv,S,D]`` with capped scores, which SDPA cannot apply, so written out.

    Like SDPA on these dtypes: inputs upcast to fp32, softmax in fp32, output cast to the query dtype.
    The ``G`` query heads of a KV head are folded into the query axis (no repeated KV heads). ``mask``
    is ``[B or 1, Hkv or 1, T, S]`` (True: visible) and broadcasts over the group; every row must keep
    one visible slot. The ``[B, Hq, T, S]`` fp32 scores are materialised: this is a reference.
    """
    b, hq, t, d = query.shape
    hkv, s = keys.shape[1], keys.shape[2]
    group = hq // hkv
    q = query.reshape(b, hkv, group * t, d).float()
    scores = soft_cap(torch.matmul(q, keys.float().transpose(-1, -2)) * scale, softcap)
    if mask is not None:
        scores = scores.view(b, hkv, group, t, s).masked_fill(~mask[:, :, None], float("-inf"))
        scores = scores.view(b, hkv, group * t, s)
    out = torch.matmul(scores.softmax(-1), values.float())
    return out.reshape(b, hq, t, values.shape[-1]).to(query.dtype)


def _one_head_if_shared(x: torch.Tensor | None) -> torch.Tensor | None:
    """Head 0 of ``[B, H, ...]`` when every head holds the same values (no per-head eviction), else ``x``.

    A mask built from one head costs ``1 / H`` of a per-head one and selects SDPA's shared-mask path.
    """
    if x is None or x.shape[1] == 1 or not bool((x == x[:, :1]).all()):
        return x
    return x[:, :1]


def _visibility(
    valid: torch.Tensor | None, new_tokens: int, slots: int, window: int | None,
    slot_positions: torch.Tensor | None, query_positions: torch.Tensor | None, device: torch.device,
) -> torch.Tensor | None:
    """The step's mask, ``[B, 1, T, S]`` when every head sees the same slots, else ``[B, Hkv, T, S]``
    (made on ``device``, the queries', when nothing else fixes it)."""
    if window is None:
        if valid is None or new_tokens == 1:
            return step_mask(valid, new_tokens, slots, device)
        return step_mask(_one_head_if_shared(valid), new_tokens, slots, device)
    shared_valid, shared_positions = _one_head_if_shared(valid), _one_head_if_shared(slot_positions)
    if (shared_valid is None or shared_valid.shape[1] == 1) and shared_positions.shape[1] == 1:
        valid, slot_positions = shared_valid, shared_positions
    return windowed_step_mask(valid, slot_positions, query_positions, window)


def cache_attention_reference(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, scale: float,
    softcap: float | None = None, window: int | None = None, slot_positions: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the step's ``T`` queries over ``S`` cache slots, the last ``T`` being the step's own.

    ``softcap`` caps the scaled scores (see ``soft_cap``); ``window`` limits each query to slots at most
    ``window - 1`` positions back, which needs ``slot_positions`` ``[B, Hkv, S]`` and ``query_positions``
    ``[B, T]`` (int64). Without them the call is exactly the plain path. A one-token step folds the window
    into ``valid`` (``window_valid``), as the runtime does for the decode kernels.
    """
    check_softcap(softcap)
    t, s = query.shape[2], keys.shape[2]
    if window is not None:
        if slot_positions is None or query_positions is None:
            raise ValueError("a sliding window needs slot_positions and query_positions")
        if t == 1:
            valid, window = window_valid(valid, slot_positions, query_positions, window), None
    if softcap is not None:
        mask = _visibility(valid, t, s, window, slot_positions, query_positions, query.device)
        return softcapped_attention(query, keys, values, mask, scale, softcap)
    if window is None:
        return _plain_cache_attention(query, keys, values, valid, scale)
    mask = _visibility(valid, t, s, window, slot_positions, query_positions, query.device)
    if mask.shape[1] != 1:
        return grouped_attention(query, keys, values, mask, scale)
    keys, values = expand_kv_heads(keys, query.shape[1]), expand_kv_heads(values, query.shape[1])
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)


def _plain_cache_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Causal attention over live slots, neither capped nor windowed, dispatched to SDPA's cheapest path.

    Decode folds query groups (no KV copy). A multi-token step whose heads all see the same slots (no
    per-head eviction) uses one ``[B, 1, T, S]`` mask, or SDPA's causal kernel when nothing is masked,
    rather than a per-head mask that would cost ``H * T * S`` bytes.

    Unmasked decode in bf16/fp16 is the exception: see ``unfolded_decode``.
    """
    t, s = query.shape[2], keys.shape[2]
    if t == 1 and valid is None and query.dtype in UNFOLDED_DECODE_DTYPES:
        return unfolded_decode(query, keys, values, scale)
    if t == 1 or (valid is not None and not bool((valid == valid[:, :1]).all())):
        return grouped_attention(query, keys, values, step_mask(valid, t, s, query.device), scale)
    # Repeating KV heads costs O(S) here against O(T * S) attention, and keeps SDPA on its fused CPU
    # kernel, which ``enable_gqa`` would leave for the math path (a full score matrix per head).
    keys, values = expand_kv_heads(keys, query.shape[1]), expand_kv_heads(values, query.shape[1])
    if valid is None and s == t:
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale)
    mask = step_mask(valid[:, :1] if valid is not None else None, t, s, query.device)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
