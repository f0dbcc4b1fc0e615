"""Real text for quality measurements, found on every machine without downloads.

The default corpus joins distinct licence texts that ship with CPython and Debian (about 25k SmolLM2
tokens), so a continuation after a long context is new text, not a copy of text the context already
holds: CPython's LICENSE.txt alone is 3.8k tokens, and repeating it makes perplexity meaningless (1.3).
"""

from __future__ import annotations

import os
import re
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


def licence_prose(exclude: str | None = None) -> str:
    """Licence prose from the machine's Debian package docs (``/usr/share/doc/*/copyright``, about 33k
    SmolLM2 tokens), the genre of the default corpus but none of its text: a paragraph sharing any run of
    eight words with ``exclude`` (default: the whole default corpus) is dropped, as are file lists, headers
    and duplicates. Fine-tuning a model that is evaluated on licence texts on pydoc alone leaves part of
    the repair to transfer across genres; this lets a run train on the genre without the evaluation text."""
    banned = _word_runs(read_text() if exclude is None else exclude)
    paragraphs: list[str] = []
    seen: set[str] = set()
    for path in sorted(Path("/usr/share/doc").glob("*/copyright")):
        for paragraph in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            lines = _prose_lines(paragraph)
            key = " ".join(lines or ()).lower()
            if lines is None or key in seen or _word_runs(key) & banned:
                continue
            seen.add(key)
            paragraphs.append("\n".join(lines))
    if not paragraphs:
        raise TokenpassError("no licence prose found under /usr/share/doc/*/copyright; pass your own token ids")
    return "\n\n".join(paragraphs)


_HEADER = re.compile(r"^\s*[A-Z][\w-]*:")  # Debian copyright-format fields: Files:, Copyright:, License:
_WORD = re.compile(r"[(\"']?[A-Za-z]+[-'A-Za-z]*[.,;:)\"']*")


def _prose_lines(paragraph: str) -> list[str] | None:
    """The paragraph's lines without format fields, or None unless it reads as prose: 30 words or more, six
    or more tokens a line (not a file list), four in five tokens plain words, no e-mail addresses."""
    lines = [" ".join(line.split()) for line in paragraph.splitlines()
             if line.strip() not in ("", ".") and not _HEADER.match(line)]
    tokens = " ".join(lines).split()
    words = [t for t in tokens if _WORD.fullmatch(t)]
    if len(words) < 30 or "@" in paragraph or len(tokens) < 6 * len(lines) or len(words) < 0.8 * len(tokens):
        return None
    return lines


def _word_runs(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}
