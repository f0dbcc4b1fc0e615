"""Checks that run a rewritten ONNX graph: what a foreign file's rewrite may assume, and did not break.

A foreign graph's attention is found by its spelling (``ir/foreign/sites.py``); whether the spelling
means what it seems is settled here by running it. ``check_same_outputs`` runs the file as it came and
as canonicalised on the same sample steps (a left-padded batch over a past, several new tokens and one)
and refuses a difference beyond float summation order. ``one_query_mask_misses`` reads each site's mask
on a one-token step and says which are not causal + padding (a sliding window, a prefix-LM mask): a
method that reads slot liveness off the mask cannot rewrite those, as on torch graphs
(``lower_kv_cache.mask_misses``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from tokenpass.errors import CaptureError
from tokenpass.ir.capture import ModelSpec
from tokenpass.ir.foreign.sites import OnnxAttentionSite
from tokenpass.ir.masks import expected_visibility, visible

PAST = 3
TOLERANCE = {torch.float32: (1e-3, 1e-4), torch.float16: (2e-2, 2e-3), torch.bfloat16: (5e-2, 1e-2)}


def sample_feeds(spec: ModelSpec, new: int, seed: int = 0, padded: bool = True) -> dict[str, np.ndarray]:
    """One step of a batch of two over a past of ``PAST`` tokens, the first row left-padded by two
    (``padded``; else one whole row: onnxruntime's fused GroupQueryAttention takes no batch of several new
    tokens over a past)."""
    rng = np.random.default_rng(seed)
    rows = 2 if padded else 1
    mask = np.ones((rows, PAST + new), dtype=np.int64)
    mask[0, : 2 if padded else 0] = 0
    feeds = {"input_ids": rng.integers(0, spec.vocab_size, (rows, new)), "attention_mask": mask,
             "position_ids": np.maximum(mask.cumsum(1) - 1, 0)[:, PAST:]}
    shape = (rows, spec.num_kv_heads, PAST, spec.head_dim)
    dtype = np.float16 if spec.dtype == torch.float16 else np.float32
    for kind in ("keys", "values"):
        feeds.update({f"past_{kind}_{i}": rng.standard_normal(shape).astype(dtype) for i in range(spec.num_layers)})
    return feeds


def run(session, feeds: dict[str, np.ndarray], renamed: dict[str, str] | None = None,
        outputs: list[str] | None = None) -> list[np.ndarray]:
    """``session`` on ``feeds`` (tokenpass's names; ``renamed``: tokenpass name -> the session's own), the
    inputs it does not take left out; ``outputs`` by tokenpass name (None: all, in its order)."""
    renamed = renamed or {}
    names = {i.name for i in session.get_inputs()}
    feeds = {renamed.get(k, k): v for k, v in feeds.items() if renamed.get(k, k) in names}
    return session.run(None if outputs is None else [renamed.get(o, o) for o in outputs], feeds)


def session_of(model: ir.Model | Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else ir.serde.serialize_model(model).SerializeToString()
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's many kinds; one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CaptureError(f"onnxruntime cannot load the rewritten graph: {first}") from None


def check_same_outputs(reference, candidate, spec: ModelSpec, what: str, renamed: dict[str, str],
                       padded: bool = True) -> None:
    """``candidate`` (a session) computes ``reference``'s outputs on sample steps of 3 and 1 new tokens;
    ``renamed``: tokenpass name -> ``reference``'s name for the inputs and outputs the candidate renamed.
    ``padded=False``: rows without padding only, where the reference pads otherwise than tokenpass."""
    atol, rtol = TOLERANCE.get(spec.dtype, TOLERANCE[torch.float32])
    names = [o.name for o in candidate.get_outputs()]
    for new in (3, 1):
        feeds = sample_feeds(spec, new, padded=padded)
        for name, want, got in zip(names, run(reference, feeds, renamed, names), run(candidate, feeds)):
            diff = float(np.abs(want.astype(np.float32) - got.astype(np.float32)).max())
            if diff > atol + rtol * float(np.abs(want).max()):
                raise CaptureError(f"{what} changed output '{name}' by {diff:.3g} on a {new}-token sample step: "
                                   "the attention tokenpass read off this graph is not what it computes; "
                                   "nothing was written")


def one_query_mask_misses(model: ir.Model, sites: list[OnnxAttentionSite], spec: ModelSpec) -> list[str]:
    """Per site whose mask, on a one-token step, is not causal + padding on every head: why."""
    masks = {id(s.mask): s.mask for s in sites if s.mask is not None}
    if not masks:
        return []
    outputs = model.graph.outputs
    added = [m for m in masks.values() if m not in outputs]
    outputs.extend(added)
    try:
        session = session_of(model)
    finally:
        for value in added:
            outputs.remove(value)
    feeds = sample_feeds(spec, 1)
    order = [o.name for o in session.get_outputs()]
    values = dict(zip(order, run(session, feeds)))
    expected = expected_visibility(torch.from_numpy(feeds["attention_mask"]), 1, 0)[:, -1, :]  # [B, S]
    misses = []
    for site in sites:
        if site.mask is None:
            continue
        seen = visible(torch.from_numpy(values[site.mask.name]))
        if seen.dim() != 4 or seen.shape[-1] != expected.shape[-1] or seen.shape[0] != 2 \
                or not torch.equal(seen[:, :, -1, :], expected[:, None, :].expand(seen.shape[0], seen.shape[1], -1)):
            misses.append(f"layer {site.layer}: its mask on a one-token step is not causal + padding")
    return misses
