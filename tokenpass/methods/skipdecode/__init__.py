"""SkipDecode (token-level early exit with batching and caching), as a method on the plug-in boundary.

Files: ``schedule.py`` (the exit schedule and its checks), ``partition.py`` (cutting the step into layer
blocks), ``gate.py`` (decode: each skippable layer behind a run-time branch), ``mask.py`` (training: the same
layers masked per position), ``ops.py``/``runtime.py`` (the gate and mask ops), ``rewrite.py`` (the pass).
``tokenpass.finetune`` trains a model under the schedule. Importing this package registers all of them.
"""

from tokenpass.methods.skipdecode import ops, runtime  # noqa: F401 - registration
from tokenpass.methods.skipdecode.rewrite import SkipDecode
from tokenpass.methods.skipdecode.schedule import LinearSchedule

__all__ = ["LinearSchedule", "SkipDecode"]
