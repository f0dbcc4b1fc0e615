"""Typed pass options: a pass is a dataclass whose fields are its options (as kvpress presses are).

The field annotations are the single source of truth for both ways options arrive: Python values are
checked against them when the pass is built (``per_kv_head="false"`` is refused there, not at the first
generate), and the CLI's ``name:option=value`` strings are parsed by them (``per_kv_head=no`` is
refused with the accepted spellings).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union

from tokenpass.errors import PassError

_TRUE, _FALSE = ("true",), ("false",)


def option_hints(cls: type) -> dict[str, Any]:
    """Field name -> annotation for a dataclass pass (empty for passes without options)."""
    if not dataclasses.is_dataclass(cls):
        return {}
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def conforms(value: object, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type (bools are not ints, ints are floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if origin in (Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence, typing.Sequence):
        return isinstance(value, (list, tuple)) and all(conforms(v, args[0]) for v in value) if args else True
    return isinstance(value, origin or hint)


def describe(hint: Any) -> str:
    """The annotation in words, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, Sequence, typing.Sequence):
        return f"a list of {describe(args[0])}" if args else "a list"
    if hint is type(None):
        return "None"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def check_options(obj: object, pass_name: str) -> None:
    """Refuse any option whose value does not match its annotation, naming pass and option."""
    for name, hint in option_hints(type(obj)).items():
        value = getattr(obj, name)
        if not conforms(value, hint):
            raise PassError(f"pass '{pass_name}': option {name} must be {describe(hint)}, got {value!r}")


def parse_option(pass_name: str, name: str, raw: str, hint: Any) -> object:
    """A CLI option string as the annotated type (the first alternative of a union that parses)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    alternatives = args if origin in (Union, types.UnionType) else (hint,)
    for alternative in alternatives:
        parsed = _parse_as(raw, alternative)
        if parsed is not _NO:
            return parsed
    raise PassError(f"pass '{pass_name}': option {name}={raw!r} is not {describe(hint)}")


_NO = object()


def _parse_as(raw: str, hint: Any) -> object:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    text = raw.strip()
    if hint is type(None):
        return None if text.lower() == "none" else _NO
    if hint is bool:
        return True if text.lower() in _TRUE else False if text.lower() in _FALSE else _NO
    if hint is int:
        return int(text) if text.lstrip("-").isdigit() else _NO
    if hint is float:
        try:
            return float(text)
        except ValueError:
            return _NO
    if hint is str:
        return text
    if origin is Literal:
        return next((a for a in args if str(a) == text), _NO)
    if origin in (list, tuple, Sequence, typing.Sequence):
        items = [_parse_as(part, args[0] if args else str) for part in text.split("/") if part]
        return _NO if not items or any(item is _NO for item in items) else items
    return _NO
