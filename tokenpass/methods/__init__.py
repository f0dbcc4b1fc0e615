"""Method passes, one package each (pass, ops, run-time policy); importing this registers them all.

See docs/writing-a-method.md for what a method adds, file by file.
"""

from tokenpass.methods import (  # noqa: F401 - registration
    cutcrossentropy,
    h2o,
    keyformer,
    skipdecode,
    streamingllm,
    tidaldecode,
    tokenselect,
)
