"""Runtime implementation of ``token_select_attention`` over the active KV cache: torch references on the
CPU; on CUDA the Triton soft-vote kernel and the sparse decode kernel TidalDecode uses too.

Per sequence: the first ``n_init`` positions and the last ``n_local`` (the step's own token included)
are always read; of the slots between, the ``top_k`` with the highest soft vote (``soft_vote``). The
selection cache keeps, per layer, the query that made the last selection and that selection; while a
row's new query has cosine similarity >= ``theta`` with it, the row reuses it and nothing is scored
(the local window still moves with the sequence). Dense when the three parts cover every live token.
With ``rot_dim`` (contiguous positions) the keys read are re-rotated to consecutive positions
(``reposition.py``).
"""

from __future__ import annotations

import torch

from tokenpass.kernels.token_select_ref import soft_vote
from tokenpass.methods.tokenselect.ops import HITS, LOOKUPS, SELECTION_CACHE, TOKEN_SELECT_ATTENTION
from tokenpass.methods.tokenselect.one_sequence import has_row_layout, one_sequence_attention
from tokenpass.methods.tokenselect.reposition import attend_repositioned
from tokenpass.runtime.context import active_cache
from tokenpass.runtime.kv_cache import KVCache
from tokenpass.runtime.ops import attend_cache, attend_slots, count_read, staged


@torch.library.impl(TOKEN_SELECT_ATTENTION, "CompositeExplicitAutograd")
def token_select_attention(query, key_new, value_new, scale, layer, n_init, n_local, top_k, theta, softcap=None,
                           inv_freq=None, rot_dim=0):
    cache = active_cache()
    keys, values, valid = staged(layer, key_new, value_new)
    live = keys.shape[2] if valid is None else int(valid.sum(-1).max())
    if n_init + top_k + n_local >= live:  # the parts cover everything: dense, exactly
        count_read(keys, values)
        return attend_cache(query, keys, values, valid, scale, softcap).contiguous()
    positions = cache.layers[layer].positions[:, 0, : keys.shape[2]]  # [B, S]: every head holds every token
    moved = (inv_freq, rot_dim) if rot_dim else None
    if valid is None and not query.is_cuda and _slots_are_positions(positions):  # CUDA: one vote kernel pass
        return _contiguous(cache, layer, query, keys, values, scale, n_init, n_local, top_k, theta, softcap, moved)
    live_slots = torch.ones_like(positions, dtype=torch.bool) if valid is None else valid[:, 0]
    last = cache.step_positions[:, -1:]  # [B, 1]
    fixed = live_slots & ((positions < n_init) | (positions > last - n_local))
    candidates = live_slots & ~fixed
    selected = _selection(cache, layer, query, keys, candidates, scale, top_k, theta, softcap)  # [B, top_k]
    chosen = fixed | torch.zeros_like(fixed).scatter_(1, selected, candidates.gather(1, selected))
    count = n_init + top_k + n_local - 1  # past slots read (the own token comes on top)
    slots = chosen[:, :-1].float().topk(min(count, keys.shape[2] - 1), dim=-1).indices  # chosen ones first
    if moved:
        return attend_repositioned(query, keys, values, chosen, slots, positions, last[:, 0], *moved, scale,
                                   softcap).contiguous()
    heads = keys.shape[1]
    read_valid = chosen[:, None, :].expand(-1, heads, -1)  # extras picked past a short row's choice: masked
    if valid is not None:
        read_valid = read_valid & valid
    out = attend_slots(query, keys, values, read_valid, slots[:, None, :].expand(-1, heads, -1), scale, softcap)
    return out.contiguous()


def _slots_are_positions(positions: torch.Tensor) -> bool:
    """Slot ``j`` holds position ``j`` in every row (no padding, no eviction, positions from 0): the
    initial, candidate and local slots are then three ranges of slots."""
    last = positions.shape[1] - 1
    if positions.shape[0] == 1:  # two scalar reads, no comparison ops
        return positions[0, 0].item() == 0 and positions[0, -1].item() == last
    return bool(((positions[:, 0] == 0) & (positions[:, -1] == last)).all())


def _contiguous(cache: KVCache, layer: int, query, keys, values, scale: float, n_init: int, n_local: int, top_k: int,
                theta: float, softcap, moved: tuple[torch.Tensor, int] | None) -> torch.Tensor:
    """The selection where every slot is live and slots are positions: the candidates are the slots
    between the first ``n_init`` and the last ``n_local``, so the vote reads that slice of K with no mask
    and the slots read are the three parts concatenated: no masks, no second top-k to find what was
    chosen (on two CPU cores those small ops cost as much as the attention they save)."""
    s = keys.shape[2]
    selected = _selection(cache, layer, query, keys[:, :, n_init : s - n_local], None, scale, top_k, theta, softcap,
                          offset=n_init)
    batch = keys.shape[0]
    if batch == 1 and softcap is None and not moved and has_row_layout(keys, values):
        return one_sequence_attention(cache.notes, query, keys, values, selected[0], n_init, n_local, scale)
    slots = torch.cat([torch.arange(n_init, device=keys.device).expand(batch, -1), selected,
                       torch.arange(s - n_local, s - 1, device=keys.device).expand(batch, -1)], dim=1)
    if moved:
        positions = torch.arange(s, device=keys.device).expand(batch, -1)
        return attend_repositioned(query, keys, values, None, slots, positions, positions[:, -1], *moved, scale,
                                   softcap).contiguous()
    out = attend_slots(query, keys, values, None, slots[:, None, :].expand(-1, keys.shape[1], -1), scale, softcap)
    return out.contiguous()


def _selection(cache: KVCache, layer: int, query, keys, candidates, scale: float, top_k: int, theta: float,
               softcap, offset: int = 0) -> torch.Tensor:
    """The ``top_k`` candidate slots by soft vote, ``[B, top_k]`` (slot indices: ``offset`` plus the index
    into ``keys``; ``candidates`` None: every slot of ``keys``); rows whose query is close to the one
    that made the layer's last selection reuse that selection (counted in the cache's notes)."""
    if theta > 1:  # the selection cache is off: count the lookups, keep nothing
        cache.notes[LOOKUPS] = int(cache.notes.get(LOOKUPS, 0)) + query.shape[0]
        cache.notes.setdefault(HITS, 0)
        return _top_votes(query, keys, candidates, scale, top_k, softcap) + offset
    flat = query.reshape(query.shape[0], -1).float()
    stored = cache.notes.setdefault(SELECTION_CACHE, {}).get(layer)
    hit = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
    if stored is not None and theta <= 1 and stored[1].shape[-1] == min(top_k, keys.shape[2]):
        hit = torch.nn.functional.cosine_similarity(flat, stored[0], dim=-1) >= theta
    cache.notes[LOOKUPS] = int(cache.notes.get(LOOKUPS, 0)) + flat.shape[0]
    cache.notes[HITS] = int(cache.notes.get(HITS, 0)) + int(hit.sum())
    if bool(hit.all()):
        return stored[1]
    fresh = _top_votes(query, keys, candidates, scale, top_k, softcap) + offset
    if stored is not None and bool(hit.any()):
        fresh = torch.where(hit[:, None], stored[1], fresh)
        flat = torch.where(hit[:, None], stored[0], flat)
    cache.notes[SELECTION_CACHE][layer] = (flat, fresh)
    return fresh


def _top_votes(query, keys, candidates, scale: float, top_k: int, softcap) -> torch.Tensor:
    """The ``top_k`` slots of ``keys`` by soft vote, ``[B, top_k]``, unsorted."""
    count_read(keys)
    if query.is_cuda:  # the Triton vote: one pass over K, no values
        from tokenpass.kernels.token_select_vote import soft_vote_kernel

        votes = soft_vote_kernel(query, keys, candidates, scale, softcap)
    else:
        votes = soft_vote(query, keys, candidates, scale, softcap)
    if candidates is not None:
        votes = votes.masked_fill(~candidates, float("-inf"))
    return votes.topk(min(top_k, votes.shape[-1]), dim=-1, sorted=False).indices
