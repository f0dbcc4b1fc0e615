"""Keyformer KV eviction (see ``rewrite.py``)."""

from tokenpass.methods.keyformer.rewrite import Keyformer

__all__ = ["Keyformer"]
