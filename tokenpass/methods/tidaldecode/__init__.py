"""TidalDecode (position-persistent sparse attention), as a method on the plug-in boundary.

Files: ``ops.py`` (graph ops and their roles), ``runtime.py`` (their implementations over the runtime
cache), ``rewrite.py`` (the pass), ``correction.py`` (the cache-correction run-time policy); kernels live
beside their references in ``tokenpass/kernels/``. Importing this package registers all of them.
"""

from tokenpass.methods.tidaldecode import correction, ops, runtime  # noqa: F401 - registration
from tokenpass.methods.tidaldecode.rewrite import TidalDecode, named_selection_layers, paper_selection_layers

__all__ = ["TidalDecode", "named_selection_layers", "paper_selection_layers"]
