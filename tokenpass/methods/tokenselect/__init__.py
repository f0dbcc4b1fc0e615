"""TokenSelect: per-head soft-voted token selection with a selection cache (see ``rewrite.py``)."""

from tokenpass.methods.tokenselect import (  # noqa: F401 - registration
    explicit_ops,
    onnx_graph,
    onnx_translation,
    runtime,
)
from tokenpass.methods.tokenselect.ops import HITS, LOOKUPS
from tokenpass.methods.tokenselect.rewrite import TokenSelect

__all__ = ["HITS", "LOOKUPS", "TokenSelect"]
