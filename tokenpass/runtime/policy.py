"""Run-time policies: what a method does between steps, built by the runtime from the graph's plain data.

A pass names a policy on the graph (``graph.add_policy(PolicySpec.of("name", option=value))``); the
runtime looks the name up here and builds one policy object per generation session. Policies see each
finished step (its phase, tokens and positions) and may act on the session: re-run tokens through
another graph, evict cache slots, and so on. The generation loop and the bench know no policy by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch

from tokenpass.errors import TokenpassError
from tokenpass.ir.requests import PolicySpec

if TYPE_CHECKING:
    from tokenpass.runtime.session import Session


@dataclass(frozen=True)
class Step:
    """One finished forward step, as policies see it."""

    phase: str  # "prefill" or "decode"
    input_ids: torch.Tensor  # [B, T]
    token_valid: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]


class Policy(ABC):
    """Subclasses set ``name``, take their options as keyword arguments, and implement ``after_step``.

    ``explicit``: the policy acts on an explicit cache (``session.GraphCache``: the past/present tensors of
    graphs that were not lowered, as the ONNX runtime also keeps them) rather than on the runtime's
    ``KVCache``; such a policy travels with an ONNX export."""

    name: ClassVar[str]
    explicit: ClassVar[bool] = False

    @abstractmethod
    def after_step(self, session: "Session", step: Step) -> None:
        """Act after ``step`` has run and its slots are committed to ``session.cache``."""


POLICIES: dict[str, type[Policy]] = {}
P = TypeVar("P", bound=type[Policy])


def register_policy(cls: P) -> P:
    if cls.name in POLICIES and POLICIES[cls.name] is not cls:
        raise TokenpassError(f"run-time policy '{cls.name}' is registered twice")
    POLICIES[cls.name] = cls
    return cls


def policy_class(spec: PolicySpec) -> type[Policy]:
    if spec.name not in POLICIES:
        known = ", ".join(sorted(POLICIES)) or "none"
        raise TokenpassError(f"the graph asks for run-time policy '{spec.name}', which is not registered "
                             f"(known: {known})")
    return POLICIES[spec.name]


def build_policies(specs: Sequence[PolicySpec]) -> list[Policy]:
    """One fresh policy object per distinct spec, for one session (a pass that declares its policy on the
    prefill and the decode graph gets one policy, not two)."""
    policies = []
    for spec in dict.fromkeys(specs):
        cls = policy_class(spec)
        try:
            policies.append(cls(**spec.kwargs()))
        except TypeError as exc:
            raise TokenpassError(f"run-time policy '{spec.name}': bad options {spec.kwargs()}: {exc}") from None
    return policies
