"""H2O KV eviction (see ``rewrite.py``)."""

from tokenpass.methods.h2o.rewrite import H2O

__all__ = ["H2O"]
