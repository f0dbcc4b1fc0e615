"""The KV cache of the step being run, reachable from inside runtime ops.

Custom ops take only tensors and scalars, so, as vLLM's forward context does, the runtime publishes the
active cache here for the duration of one graph call and the attention ops look it up by layer index.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from tokenpass.errors import TokenpassError
from tokenpass.runtime.kv_cache import KVCache

_ACTIVE: ContextVar[KVCache | None] = ContextVar("tokenpass_active_cache", default=None)


@contextlib.contextmanager
def using_cache(cache: KVCache) -> Iterator[KVCache]:
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


def active_cache() -> KVCache:
    cache = _ACTIVE.get()
    if cache is None:
        raise TokenpassError(
            "a tokenpass runtime attention op ran outside the runtime: call the OptimizedModel "
            "(or TokenGraph.run), not the exported program directly"
        )
    return cache
