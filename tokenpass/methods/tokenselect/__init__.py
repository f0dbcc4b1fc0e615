"""TokenSelect: per-head soft-voted token selection with a selection cache (see ``rewrite.py``)."""

from tokenpass.methods.tokenselect import runtime  # noqa: F401 - implements the op
from tokenpass.methods.tokenselect.ops import HITS, LOOKUPS
from tokenpass.methods.tokenselect.rewrite import TokenSelect

__all__ = ["HITS", "LOOKUPS", "TokenSelect"]
