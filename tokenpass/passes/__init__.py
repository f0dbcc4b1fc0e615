"""Graph passes. Importing this package registers every built-in pass under its CLI name."""

from tokenpass.passes import canonicalize_attention, dce, lower_kv_cache  # noqa: F401 - registration
from tokenpass.passes.base import Miss, Pass, PassResult
from tokenpass.passes.manager import PassManager
from tokenpass.passes.registry import PASSES, make_pass, pass_names, register

__all__ = ["Miss", "Pass", "PassManager", "PassResult", "PASSES", "make_pass", "pass_names", "register"]
