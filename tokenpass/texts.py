"""Real text for quality measurements, found on every machine without downloads."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from tokenpass.errors import TokenpassError

_CANDIDATES = (
    Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt",  # CPython's licence (about 14k tokens)
    Path("/usr/share/common-licenses/GPL-3"),
    Path("/usr/share/common-licenses/Apache-2.0"),
)


def default_text_path() -> Path:
    for path in _CANDIDATES:
        if path.is_file():
            return path
    raise TokenpassError(f"no default text found (looked for {', '.join(map(str, _CANDIDATES))}); pass --text FILE")


def read_text(path: str | os.PathLike | None = None) -> str:
    path = Path(path) if path else default_text_path()
    if not path.is_file():
        raise TokenpassError(f"text file {path} does not exist")
    return path.read_text(encoding="utf-8", errors="replace")


def token_ids(tokenizer, text: str, needed: int) -> list[int]:
    """``needed`` token ids of ``text``, repeating it if it is too short."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TokenpassError("the text is empty")
    while len(ids) < needed:
        ids = ids + ids
    return ids[:needed]
