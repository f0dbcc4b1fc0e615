"""TidalDecode (position-persistent sparse attention), as a method on the plug-in boundary.

Files: ``ops.py`` (graph ops on the runtime cache and their roles), ``runtime.py`` (their implementations
over the runtime cache), ``explicit_ops.py`` (the same layers on explicit cache tensors, for graphs not
lowered), ``onnx_translation.py`` (those in standard ONNX ops), ``rewrite.py`` (the pass),
``correction.py`` (the cache-correction run-time policy); kernels live beside their references in
``tokenpass/kernels/``. Importing this package registers all of them.
"""

from tokenpass.methods.tidaldecode import (  # noqa: F401 - registration
    correction,
    explicit_ops,
    onnx_graph,
    onnx_translation,
    ops,
    runtime,
)
from tokenpass.methods.tidaldecode.rewrite import TidalDecode, named_selection_layers, paper_selection_layers

__all__ = ["TidalDecode", "named_selection_layers", "paper_selection_layers"]
