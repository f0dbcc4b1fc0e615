"""The plug-in point for passes over foreign ONNX graphs: a method registers how it rewrites canonical
``tokenpass.Attention`` calls (``ir/foreign/canonicalize.py``), beside its torch rewrite.

A rewrite gets the pass (its options), the step's model, its canonical sites in layer order and what
the checks found (``OnnxContext``), and returns an ``OnnxRewriteResult``: what it changed, by count, or
why it could not (``misses``: all or nothing, the model is then left as it was). The caller removes
what the rewrite left unused (replaced nodes, functions no longer called). A pass with no registered
rewrite is refused in one line naming it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_ir as ir

from tokenpass.errors import PassError
from tokenpass.ir.capture import ModelSpec
from tokenpass.ir.foreign.sites import OnnxAttentionSite
from tokenpass.passes.base import Pass


@dataclass
class OnnxContext:
    """What the rewrites of one step may rely on."""

    spec: ModelSpec
    opset: int
    mask_misses: list[str] = field(default_factory=list)  # sites whose mask is not causal + padding


@dataclass
class OnnxRewriteResult:
    pass_name: str
    counts: Counter = field(default_factory=Counter)
    misses: list[str] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return not self.misses and any(v for k, v in self.counts.items() if k != "already_applied")


OnnxRewrite = Callable[[Pass, ir.Model, list[OnnxAttentionSite], OnnxContext], OnnxRewriteResult]
_REWRITES: dict[str, OnnxRewrite] = {}


def register_onnx_rewrite(pass_name: str, rewrite: OnnxRewrite) -> None:
    _REWRITES[pass_name] = rewrite


def onnx_rewrite(p: Pass) -> OnnxRewrite:
    """The rewrite registered for ``p``; a pass without one is refused, naming those that have one."""
    if p.name not in _REWRITES:
        have = ", ".join(sorted(_REWRITES)) or "none yet"
        raise PassError(f"pass '{p.name}' has no rewrite for ONNX graphs yet (passes that rewrite .onnx files: {have})")
    return _REWRITES[p.name]
