"""KV eviction machinery shared by Keyformer, H2O and StreamingLLM: a scored attention op, the
per-slot score state, an eviction policy and the base pass (see ``rewrite.py``)."""

from tokenpass.methods.kvevict import explicit_policy, onnx_translation, runtime  # noqa: F401 - ops, policy
from tokenpass.methods.kvevict.policy import BUDGETS, EVICTED, Evict
from tokenpass.methods.kvevict.rewrite import KVEviction

__all__ = ["BUDGETS", "EVICTED", "Evict", "KVEviction"]
