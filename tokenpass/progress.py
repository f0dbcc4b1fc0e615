"""Progress display for slow steps (loading, export, generation), on stderr so JSON on stdout stays clean."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from rich.console import Console

_console = Console(stderr=True)


def enabled() -> bool:
    return os.environ.get("TOKENPASS_PROGRESS", "1") != "0" and sys.stderr.isatty()


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with ``message`` while the block runs (silent when stderr is not a terminal)."""
    if not enabled():
        yield
        return
    with _console.status(message):
        yield


def steps(iterable, description: str):
    """Iterate with a progress bar on a terminal (plain iteration otherwise)."""
    if not enabled():
        yield from iterable
        return
    from rich.progress import track

    yield from track(iterable, description=description, console=_console, transient=True)
