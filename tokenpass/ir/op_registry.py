"""The attention-op registry: every op that computes attention, registered once with its argument roles.

Why a registry: sites, passes, the inspector and (later) ONNX export need to read "the query", "the
layer" or "the slots this layer reads" off an attention node. Hard-coding argument positions per op in
the core meant every new method op edited ``sites.py``. Instead an op is registered once, by the file
that defines it, with a role for each schema argument it cares about, and the core reads roles.

Standard roles: ``query``, ``key``, ``value`` (for runtime-cache ops: the step's *new* keys/values),
``scale``, ``layer``, and optionally ``mask``, ``is_causal``, ``softcap``, ``window``. Any other role
(``slots`` for ops that read a selection made by another layer, ...) is an extra input the op declares;
the layer picture draws edges for tensor-valued extra inputs.

``reads_runtime_cache`` marks ops whose keys/values live in the runtime-owned KV cache rather than in
graph tensors: a graph holding them runs only inside the runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from tokenpass.errors import TokenpassError

STANDARD_ROLES = ("query", "key", "value", "scale", "layer", "mask", "is_causal", "softcap", "window")
REQUIRED_ROLES = ("query", "key", "value")
_MISSING = object()


@dataclass(frozen=True)
class AttentionOp:
    """One registered attention op and where each role sits in its schema."""

    op: torch._ops.OpOverload
    name: str  # display name, e.g. "tokenpass.cached_attention"
    roles: Mapping[str, str]  # role -> schema argument name
    reads_runtime_cache: bool = False
    positions: Mapping[str, int] = field(default_factory=dict)  # schema argument name -> index
    defaults: Mapping[str, Any] = field(default_factory=dict)  # schema argument name -> default

    def arg(self, node: fx.Node, role: str, default: Any = None) -> Any:
        """The value ``node`` passes for ``role`` (its schema default, or ``default``, when absent)."""
        name = self.roles.get(role)
        if name is None:
            return default
        index = self.positions[name]
        if index < len(node.args):
            return node.args[index]
        if name in node.kwargs:
            return node.kwargs[name]
        value = self.defaults.get(name, _MISSING)
        return default if value is _MISSING or value is None else value

    def args(self, node: fx.Node) -> dict[str, Any]:
        """Every role ``node`` fills, by role name."""
        return {role: self.arg(node, role) for role in self.roles}

    def extra_roles(self) -> list[str]:
        """Roles beyond the standard ones (inputs a method op adds, such as a selection's slots)."""
        return [role for role in self.roles if role not in STANDARD_ROLES]


_REGISTRY: dict[torch._ops.OpOverload, AttentionOp] = {}


def register_attention_op(
    op: torch._ops.OpOverload, roles: Mapping[str, str], name: str | None = None, reads_runtime_cache: bool = False
) -> AttentionOp:
    """Register ``op`` as attention; ``roles`` maps role -> schema argument name (checked here)."""
    schema = op._schema
    positions = {a.name: i for i, a in enumerate(schema.arguments)}
    defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    missing = [r for r in REQUIRED_ROLES if r not in roles]
    unknown = [arg for arg in roles.values() if arg not in positions]
    if missing or unknown:
        raise TokenpassError(
            f"attention op {schema.name}: roles lack {missing} or name arguments not in its schema {unknown}"
        )
    spec = AttentionOp(
        op=op,
        name=name or schema.name.replace("::", "."),
        roles=dict(roles),
        reads_runtime_cache=reads_runtime_cache,
        positions=positions,
        defaults=defaults,
    )
    if op in _REGISTRY and _REGISTRY[op] != spec:
        raise TokenpassError(f"attention op {spec.name} is registered twice with different roles")
    _REGISTRY[op] = spec
    return spec


def lookup_attention(node: fx.Node) -> AttentionOp | None:
    """The registration of ``node``'s op, or ``None`` when ``node`` is not a registered attention op."""
    if node.op != "call_function":
        return None
    return _REGISTRY.get(node.target)


def attention_ops() -> list[AttentionOp]:
    return list(_REGISTRY.values())


def runtime_cache_ops() -> list[AttentionOp]:
    return [spec for spec in _REGISTRY.values() if spec.reads_runtime_cache]
