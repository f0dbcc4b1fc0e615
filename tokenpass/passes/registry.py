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
    """A pass instance from an instance (returned as is) or a name with options.

    The string form is what the CLI takes: ``name`` or ``name:option=value:option=value``, where a
    value is an int, a float, true/false, or a ``/``-separated list of ints
    (``tidaldecode:top_k=512:selection_layers=2/8/16``).
    """
    if isinstance(spec, Pass):
        return spec
    name, *options = str(spec).split(":")
    if name not in PASSES:
        raise PassError(f"unknown pass {name!r}: choose one of {', '.join(pass_names())}")
    kwargs = dict(_option(name, text) for text in options)
    try:
        return PASSES[name](**kwargs)
    except TypeError as exc:
        raise PassError(f"pass '{name}': bad options {kwargs}: {exc}") from None


def _option(pass_name: str, text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise PassError(f"pass '{pass_name}': option {text!r} is not key=value")
    if raw.lower() in ("true", "false"):
        return key, raw.lower() == "true"
    try:
        if "/" in raw:
            return key, [int(v) for v in raw.split("/") if v]
        return key, int(raw)
    except ValueError:
        pass
    try:
        return key, float(raw)
    except ValueError:
        return key, raw


def providers(prop: str) -> list[str]:
    """Registered passes that provide ``prop`` (to suggest a fix for a bad order)."""
    return sorted(name for name, cls in PASSES.items() if prop in cls.provides)
