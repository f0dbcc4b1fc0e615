"""What an attention mask in a captured graph really lets each query see, checked by running it.

Lowering onto the runtime cache drops the graph's mask code: the runtime re-derives visibility from
per-slot validity, positions and the layer's window. That is only right if the graph's mask computes
exactly causal + padding (+ the window the config declares). Rather than trusting the config or the
shape of the mask code, the lowering runs the graph once on sample inputs longer than any declared
window, reads each attention site's mask, and compares it with that rule on every real query. A model
whose masks compute something else (bidirectional prefixes, chunked attention, a window its config
does not declare) is then refused with the first position that differs, never run wrong.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx


def node_values(module: fx.GraphModule, inputs: tuple, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The values nodes ``names`` take when ``module`` runs on ``inputs`` (flattened like the program's)."""
    wanted, seen = set(names), {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node):
            value = super().run_node(node)
            if node.name in wanted:
                seen[node.name] = value
            return value

    flat = torch.utils._pytree.tree_leaves(inputs)
    with torch.no_grad():
        Recorder(module).run(*flat)
    return seen


def visible(mask: torch.Tensor) -> torch.Tensor:
    """Boolean visibility of an SDPA-style mask: True entries of a bool mask, finite-and-not-huge-negative
    entries of an additive float mask."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def one_query_liveness(mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor | None:
    """``[B, Hkv, S]`` liveness of the slots of ``key`` ``[B, Hkv, S, D]`` from a one-query step's mask
    ``[B, 1|H, 1, S]`` (None: every slot is live). Only for masks checked to be causal + padding on every
    head (``lower_kv_cache.mask_misses``): the first head's row then speaks for all."""
    if mask is None:
        return None
    b, hkv, s, _ = key.shape
    return visible(mask)[:, :1, -1, :].expand(b, hkv, s)


def expected_visibility(attention_mask: torch.Tensor, new: int, window: int) -> torch.Tensor:
    """``[B, T, S]``: key j visible to query i iff j is a real token, j <= i, and (window) i - j < window,
    counting positions over real tokens as the runtime does (on ``attention_mask``'s device, the model's)."""
    real = attention_mask.bool()
    positions = attention_mask.long().cumsum(-1) - 1
    s = attention_mask.shape[1]
    query_slot = torch.arange(s - new, s, device=attention_mask.device)
    causal = torch.arange(s, device=attention_mask.device)[None, :] <= query_slot[:, None]  # [T, S]
    seen = real[:, None, :] & causal[None]
    if window:
        distance = positions[:, s - new :, None] - positions[:, None, :]
        seen &= distance < window
    return seen


def first_difference(observed: torch.Tensor, attention_mask: torch.Tensor, new: int, window: int) -> str | None:
    """Where an observed mask ``[B, 1|H, T, S]`` differs from the runtime's rule on a real query, or None."""
    expected = expected_visibility(attention_mask, new, window)
    seen = visible(observed)
    if seen.dim() != 4 or seen.shape[-2:] != expected.shape[-2:]:
        return f"mask of shape {tuple(observed.shape)} is not [B, H, {expected.shape[1]}, {expected.shape[2]}]"
    real_queries = attention_mask[:, -new:].bool()[:, None, :, None]  # padding queries may see anything
    differs = (seen != expected[:, None]) & real_queries
    if not bool(differs.any()):
        return None
    b, h, i, j = (int(x) for x in differs.nonzero()[0])
    state = "sees" if bool(seen[b, h, i, j]) else "hides"
    return f"row {b} query {i} {state} key {j}, unlike causal + padding" + (f" + window {window}" if window else "")
