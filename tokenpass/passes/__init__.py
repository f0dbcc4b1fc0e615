"""Graph passes. Importing this package registers every built-in pass under its CLI name."""

from tokenpass.passes import (  # noqa: F401 - registration
    canonicalize_attention,
    dce,
    eliminate_noops,
    lower_kv_cache,
    select_logit_rows,
)
from tokenpass.passes.base import Miss, Pass, PassResult
from tokenpass.passes.manager import PassManager
from tokenpass.passes.registry import PASSES, make_pass, pass_names, register

__all__ = ["Miss", "Pass", "PassManager", "PassResult", "PASSES", "make_pass", "pass_names", "register"]
