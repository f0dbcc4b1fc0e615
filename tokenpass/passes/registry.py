"""Pass registry: the names here are what ``optimize(passes=[...])`` and the CLI's ``--passes`` accept."""

from __future__ import annotations

from typing import TypeVar

from tokenpass.errors import PassError
from tokenpass.passes.base import Pass

PASSES: dict[str, type[Pass]] = {}
P = TypeVar("P", bound=type[Pass])


def register(cls: P) -> P:
    if cls.name in PASSES:
        raise PassError(f"pass name '{cls.name}' is registered twice ({PASSES[cls.name].__name__}, {cls.__name__})")
    PASSES[cls.name] = cls
    return cls


def pass_names() -> list[str]:
    return sorted(PASSES)


def make_pass(spec: "str | Pass") -> Pass:
    """A pass instance from an instance (returned as is) or a registered name with default options."""
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, str) and spec in PASSES:
        return PASSES[spec]()
    raise PassError(f"unknown pass {spec!r}: choose one of {', '.join(pass_names())}")


def providers(prop: str) -> list[str]:
    """Registered passes that provide ``prop`` (to suggest a fix for a bad order)."""
    return sorted(name for name, cls in PASSES.items() if prop in cls.provides)
