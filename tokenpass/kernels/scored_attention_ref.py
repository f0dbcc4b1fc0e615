"""Exact torch reference of attention that also scores the keys it reads (Keyformer, H2O).

Eviction by accumulated attention needs, per KV head and slot, the sum over queries (and over the query
heads sharing the KV head) of a softmax over that query's scores. A fused SDPA does not expose its
probabilities, and a second pass over the keys to recompute them would double what attention reads, so
this reference computes the scores ``x = q . k * scale`` once and derives both the output
(``softmax(x) @ V``) and the score contribution ``sum softmax((x + g) / tau)`` from them.

``g`` is Gumbel noise (Keyformer's regularisation; ``noise=False`` for H2O or a noise-free Keyformer).
It is a function of (seed, layer, query head, query position, key position) only: a hash per pair for
a prefill's many queries; for a decode step, a window of a fixed table of Gumbel draws at an offset
hashed from the query, one entry per key position. A row's noise
then does not depend on the other rows of the batch, on its left padding or on where its slots sit in
the cache, so a batch gives each row what it gets alone.

Shapes: queries ``[B, Hq, T, D]``, keys/values ``[B, Hkv, S, D]``, visibility ``mask`` ``[B, Hkv, T, S]``
(or ``[B, Hkv, S]`` for one query, or None: all visible), ``query_positions`` ``[B, T]``,
``slot_positions`` ``[B, Hkv, S]``. Returns the output ``[B, Hq, T, D]`` and the contribution
``[B, Hkv, S]`` in fp32 (zero for slots no real query sees).
"""

from __future__ import annotations

import torch

from tokenpass.kernels.cache_attention_ref import check_softcap, soft_cap

QUERY_CHUNK = 256  # prefill queries scored at once: bounds the [B, Hq, chunk, S] score buffer
_MASK32 = 0xFFFFFFFF
_TABLE_SIZE = 1 << 20  # decode noise: Gumbel draws read at hashed offsets (a power of two: the index is masked)
_TABLES: dict[str, torch.Tensor] = {}


def _mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer finaliser (lowbias32) on int64 tensors (or Python ints) holding values in
    ``[0, 2**32)``: the small per-query and per-key hashes."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """Values in ``[0, 2**32)`` (int64) as the int32 with the same bits."""
    return (x - (x >= 2**31).long() * 2**32).to(torch.int32)


def _mix_pairs(x: torch.Tensor) -> torch.Tensor:
    """One multiply-xorshift round on int32, in place (wrapping multiplies, logical shifts): the full-size
    step, kept to a few cheap passes because it runs over every (query, key) pair of a prefill."""
    x.mul_(-1640531535)  # 0x9E3779B1 as int32
    x.bitwise_xor_(x.bitwise_right_shift(15).bitwise_and_(0x1FFFF))
    x.mul_(-2048144777)  # 0x85EBCA77 as int32
    return x.bitwise_xor_(x.bitwise_right_shift(13).bitwise_and_(0x7FFFF))


def gumbel_noise(seed: int, layer: int, query_positions: torch.Tensor, slot_positions: torch.Tensor,
                 query_heads: int) -> torch.Tensor:
    """Gumbel(0, 1) noise ``[B, Hkv, G, T, S]`` keyed by (seed, layer, query head, query and key position).

    Each query (head and position) and each key position gets a full 32-bit hash once; their xor is mixed
    once more per pair. Uniforms have 23 bits, so they are exact in fp32 and the noise is never infinite.
    """
    if query_positions.shape[-1] == 1:
        return _decode_noise(seed, layer, query_positions, slot_positions, query_heads)
    b, hkv, s = slot_positions.shape
    group = query_heads // hkv
    device = slot_positions.device
    head = torch.arange(query_heads, device=device).view(1, hkv, group, 1, 1)
    base = _mix32(torch.tensor((seed * 1_000_003 + layer) & _MASK32, device=device))
    per_query = _mix32((_mix32((base + head * 0x9E3779B9) & _MASK32)
                        + query_positions.view(b, 1, 1, -1, 1) * 0x85EBCA6B) & _MASK32)
    per_key = _mix32((slot_positions.view(b, hkv, 1, 1, s) * 0xC2B2AE35 + 0x27D4EB2F) & _MASK32)
    bits = _mix_pairs(_to_int32(per_query) ^ _to_int32(per_key))
    uniform = bits.bitwise_right_shift_(9).bitwise_and_(0x7FFFFF).float().add_(0.5).mul_(2.0**-23)  # in (0, 1)
    return uniform.log_().neg_().log_().neg_()


def _decode_noise(seed: int, layer: int, query_positions: torch.Tensor, slot_positions: torch.Tensor,
                  query_heads: int) -> torch.Tensor:
    """One query per row: each query head reads a window of a fixed table of Gumbel draws, at an offset
    hashed from (seed, layer, head, the query's position), one entry per key position.

    Within a step every key of a head gets its own draw; across steps a key lands on other entries (the
    offset moves), so its noise is fresh each step. A decode step then costs one add, one mask and one
    gather per layer: drawing fresh uniforms for every key position (a generator per row) cost 0.28 ms a
    layer at 8000 positions, a quarter of a dense layer's attention. The noise is still a function of
    positions only (a row gets the same alone and in any batch, wherever its slots sit)."""
    b, hkv, s = slot_positions.shape
    group = query_heads // hkv
    # ``_mix32`` on Python ints: a handful of offsets per layer, not worth a tensor op each
    base = _mix32((seed * 1_000_003 + layer) & _MASK32)
    offsets = [[_mix32((_mix32((base + head * 0x9E3779B9) & _MASK32) + position * 0x85EBCA6B) & _MASK32)
                for head in range(query_heads)] for position in query_positions[:, 0].tolist()]
    offset = torch.tensor(offsets, device=slot_positions.device).view(b, hkv, group, 1)
    index = (slot_positions[:, :, None, :] + offset).bitwise_and_(_TABLE_SIZE - 1)  # [B, Hkv, G, S]
    return _gumbel_table(slot_positions.device).take(index).unsqueeze(3)  # [B, Hkv, G, 1, S]


def _gumbel_table(device: torch.device) -> torch.Tensor:
    """``_TABLE_SIZE`` Gumbel(0, 1) draws from a fixed generator, made once per device (4 MB)."""
    table = _TABLES.get(str(device))
    if table is None:
        generator = torch.Generator().manual_seed(0x5EED)
        uniform = torch.rand(_TABLE_SIZE, generator=generator, dtype=torch.float64).clamp_(min=2.0**-53)
        table = _TABLES[str(device)] = uniform.log_().neg_().log_().neg_().float().to(device)
    return table


def scored_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    query_valid: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
    slot_positions: torch.Tensor | None = None,
    tau: float = 1.0,
    noise: bool = False,
    seed: int = 0,
    layer: int = 0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and per-slot score contribution in one pass over the keys (see the module doc).

    ``query_valid`` ``[B, T]`` drops padding queries from the contribution; ``noise`` needs both position
    tensors. Queries are processed ``QUERY_CHUNK`` at a time.
    """
    check_softcap(softcap)
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau!r}")
    b, hq, t, d = query.shape
    hkv, s = keys.shape[1], keys.shape[2]
    group = hq // hkv
    if mask is not None and mask.dim() == 3:
        mask = mask[:, :, None, :]
    outputs, contribution = [], torch.zeros((b, hkv, s), dtype=torch.float32, device=query.device)
    # last chunk first: a causal prompt's chunks read ever fewer slots, so each buffer fits in the last
    # one's freed memory (first to last, every chunk would need a larger block than any freed yet)
    for start in reversed(range(0, t, QUERY_CHUNK)):
        stop = min(t, start + QUERY_CHUNK)
        c = stop - start
        visible = None if mask is None else mask[:, :, None, start:stop] if mask.shape[2] > 1 else mask[:, :, None]
        n = s if visible is None or t == 1 else _reach(visible)
        q = query[:, :, start:stop].float().reshape(b, hkv, group * c, d)  # the group folded into the rows:
        x = torch.matmul(q, keys[:, :, :n].float().transpose(-1, -2)).view(b, hkv, group, c, n)  # K rows read once
        x = soft_cap(x * scale, softcap)
        if visible is not None:
            x = x.masked_fill(~visible[..., :n], float("-inf"))
        probs = x.softmax(-1).view(b, hkv, group * c, n)
        outputs.append(torch.matmul(probs, values[:, :, :n].float()).view(b, hq, c, -1))
        valid_rows = None if query_valid is None else query_valid[:, start:stop]
        if noise or tau != 1.0:
            contribution[:, :, :n] += score_contribution(
                x, tau, noise, seed, layer, None if query_positions is None else query_positions[:, start:stop],
                None if slot_positions is None else slot_positions[:, :, :n], valid_rows)
        else:  # plain accumulated attention (H2O): the output's own probabilities
            contribution[:, :, :n] += _summed(probs.view(b, hkv, group, c, n), valid_rows)
    return torch.cat(outputs[::-1], 2).to(query.dtype), contribution


def _reach(visible: torch.Tensor) -> int:
    """How many leading slots some query of a chunk sees (``visible`` ``[B, Hkv, 1, c, S]``): a causal
    prompt's early chunks see only the slots before them, so the rest is neither multiplied nor scored
    (a 4096-token prompt then costs about half)."""
    seen = visible.flatten(0, -2).any(0).nonzero()
    return int(seen.max()) + 1 if seen.numel() else 1


def score_contribution(scores: torch.Tensor, tau: float = 1.0, noise: bool = False, seed: int = 0, layer: int = 0,
                       query_positions: torch.Tensor | None = None, slot_positions: torch.Tensor | None = None,
                       query_valid: torch.Tensor | None = None) -> torch.Tensor:
    """``sum over G and T of softmax((x + g) / tau)`` ``[B, Hkv, S]`` from masked scaled scores ``x``
    ``[B, Hkv, G, T, S]`` (dead slots at ``-inf``): what a decode kernel that returns its scores (written in
    its one pass over K) needs to finish the score without reading K again."""
    if noise:
        scores = scores + gumbel_noise(seed, layer, query_positions, slot_positions, scores.shape[1] * scores.shape[2])
    probs = (scores / tau).softmax(-1) if tau != 1.0 else scores.softmax(-1)
    return _summed(probs, query_valid)


def _summed(probs: torch.Tensor, query_valid: torch.Tensor | None) -> torch.Tensor:
    """``[B, Hkv, G, T, S]`` probabilities summed over the group and the real queries -> ``[B, Hkv, S]``."""
    if query_valid is not None:
        probs = probs * query_valid[:, None, None, :, None]
    return probs.sum((2, 3))


def temperature(tau_init: float, tau_end: float, step: int, horizon: int) -> float:
    """Keyformer's temperature at decode step ``step``: linear from ``tau_init`` to ``tau_end`` over
    ``horizon`` steps, then held (the prompt is scored at ``tau_init``)."""
    if horizon <= 0:
        return tau_end
    return tau_init + (tau_end - tau_init) * min(1.0, max(0, step) / horizon)

