"""One line for a step input the captured program was not traced to accept.

``ExportedProgram.module()`` checks its guards and raises a bare ``AssertionError: Guard failed: ...``
from deep inside torch; the runtime turns that into a ``TokenpassError`` naming the step, the input and
dim, and the condition.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from tokenpass.errors import TokenpassError
from tokenpass.ir.graph import TokenGraph

GUARD_FAILED = "Guard failed: "  # how ExportedProgram.module() reports inputs its trace does not cover
_GUARD_INPUT = re.compile(r"(\w+)(?:\[\d+\])*\.size\(\)\[(\d+)\]")


def guard_error(graph: TokenGraph, exc: AssertionError, input_ids: torch.Tensor) -> TokenpassError:
    condition = str(exc)[len(GUARD_FAILED) :].strip().splitlines()[0]
    found = _GUARD_INPUT.search(condition)
    where = f"{found.group(1)} dim {found.group(2)}" if found else "its inputs"
    return TokenpassError(
        f"the {graph.label} step cannot run on input_ids of shape {tuple(input_ids.shape)}: "
        f"{where} violates the captured program's guard {condition}"
    )


@contextlib.contextmanager
def guarded(graph: TokenGraph, input_ids: torch.Tensor) -> Iterator[None]:
    """Re-raise a guard failure of ``graph``'s program as one ``TokenpassError`` line."""
    try:
        yield
    except AssertionError as exc:
        if not str(exc).startswith(GUARD_FAILED):
            raise
        raise guard_error(graph, exc, input_ids) from None
