"""Cut Cross-Entropy (Wijmans et al. 2024): the LM head and the loss fused, so training never holds the
``[tokens, vocab]`` logits.

Files: ``ops.py`` (the registered op ``tokenpass::linear_cross_entropy`` with its fake implementation and
autograd, dispatching to the Triton kernels on CUDA and the chunked torch path elsewhere); kernels live
beside their references in ``tokenpass/kernels/`` (``linear_cross_entropy.py``,
``linear_cross_entropy_ref.py``). Importing this package registers the ops and the pass.

``match.py`` finds an LM head feeding a cross-entropy in a captured training step (or says which node
breaks the pattern); ``rewrite.py`` is the ``cutcrossentropy`` pass that replaces them with the op.

``distributed.py``: ``vocab_parallel_linear_cross_entropy``, the same loss when the head is sharded by
vocabulary across a ``torch.distributed`` group (tensor parallelism): per-shard LSE and target logits
combined by all-reduce, never the ``N x V/W`` logits (unlike DTensor's ``loss_parallel``); ``shard_vocab``
splits a head evenly.
"""

from tokenpass.methods.cutcrossentropy import ops  # noqa: F401 - registration
from tokenpass.methods.cutcrossentropy.distributed import vocab_parallel_linear_cross_entropy
from tokenpass.methods.cutcrossentropy.ops import linear_cross_entropy
from tokenpass.methods.cutcrossentropy.rewrite import CutCrossEntropy

__all__ = ["CutCrossEntropy", "linear_cross_entropy", "vocab_parallel_linear_cross_entropy"]
