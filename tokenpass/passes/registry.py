"""Pass registry: the names here are what ``optimize(passes=[...])`` and the CLI's ``--passes`` accept."""

from __future__ import annotations

from typing import TypeVar

from tokenpass.errors import PassError
from tokenpass.passes.base import Pass
from tokenpass.passes.options import option_hints, parse_option

PASSES: dict[str, type[Pass]] = {}
P = TypeVar("P", bound=type[Pass])


def register(cls: P) -> P:
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise PassError(f"pass name '{cls.name}' is registered twice ({PASSES[cls.name].__name__}, {cls.__name__})")
    PASSES[cls.name] = cls
    return cls


def pass_names() -> list[str]:
    return sorted(PASSES)


def make_pass(spec: "str | Pass | type[Pass]") -> Pass:
    """A pass instance from an instance (returned as is), a pass class (default options) or a name with
    options.

    The string form is what the CLI takes: ``name`` or ``name:option=value:option=value``; each value is
    parsed by the option's annotation (true/false, integers, numbers, ``none``, ``/``-separated lists:
    ``tidaldecode:top_k=512:selection_layers=2/8/16``).
    """
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, type) and issubclass(spec, Pass):
        return spec()
    if not isinstance(spec, str):
        raise PassError(f"a pass is a name, a Pass object or a Pass class, got {type(spec).__name__} {spec!r}")
    name, *options = spec.split(":")
    if name not in PASSES:
        raise PassError(f"unknown pass {name!r}: choose one of {', '.join(pass_names())}")
    cls = PASSES[name]
    hints = option_hints(cls)
    kwargs = {}
    for text in options:
        key, sep, raw = text.partition("=")
        if not sep or not key:
            raise PassError(f"pass '{name}': option {text!r} is not key=value")
        if key not in hints:
            known = ", ".join(hints) or "none"
            raise PassError(f"pass '{name}' has no option {key!r} (options: {known})")
        kwargs[key] = parse_option(name, key, raw, hints[key])
    return cls(**kwargs)


def providers(prop: str) -> list[str]:
    """Registered passes that provide ``prop`` (to suggest a fix for a bad order)."""
    return sorted(name for name, cls in PASSES.items() if prop in cls.provides)
