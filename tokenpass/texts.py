"""Real text for quality measurements, found on every machine without downloads.

The default corpus joins distinct licence texts that ship with CPython and Debian (about 25k SmolLM2
tokens), so a continuation after a long context is new text, not a copy of text the context already
holds: CPython's LICENSE.txt alone is 3.8k tokens, and repeating it makes perplexity meaningless (1.3).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from tokenpass.errors import TokenpassError

_CORPUS = (
    Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt",
    Path("/usr/share/common-licenses/GPL-3"),
    Path("/usr/share/common-licenses/Apache-2.0"),
    Path("/usr/share/common-licenses/MPL-2.0"),
    Path("/usr/share/common-licenses/GFDL-1.3"),
    Path("/usr/share/common-licenses/Artistic"),
    Path("/usr/share/common-licenses/CC0-1.0"),
)


def default_text_paths() -> list[Path]:
    paths = [p for p in _CORPUS if p.is_file()]
    if not paths:
        raise TokenpassError(f"no default text found (looked for {', '.join(map(str, _CORPUS))}); pass --text FILE")
    return paths


def describe_default_text() -> str:
    paths = default_text_paths()
    return f"{paths[0]} + {len(paths) - 1} Debian licence texts" if len(paths) > 1 else str(paths[0])


def read_text(path: str | os.PathLike | None = None) -> str:
    """The file at ``path``, or the default corpus."""
    if path is None:
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in default_text_paths())
    path = Path(path)
    if not path.is_file():
        raise TokenpassError(f"text file {path} does not exist")
    return path.read_text(encoding="utf-8", errors="replace")


def token_ids(tokenizer, text: str, needed: int) -> list[int]:
    """The first ``needed`` token ids of ``text``; a shorter text is an error (repeating it would be copying)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < needed:
        raise TokenpassError(f"the text has {len(ids)} tokens, fewer than the {needed} needed; give a longer --text")
    return ids[:needed]


def finetune_text() -> str:
    """English prose for fine-tuning that is not the default (evaluation) corpus: CPython's pydoc topics
    (the language reference's sections, about 110k SmolLM2 tokens), shipped with every CPython."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data out
        raise TokenpassError("no fine-tuning text found (pydoc_data is missing from this Python); pass your own "
                             "token ids") from None
    return "\n\n".join(topics[key] for key in sorted(topics))
