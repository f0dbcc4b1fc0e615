"""The scored-attention op eviction methods rewrite cache attention into, declared with its roles.

``tokenpass::scored_attention`` attends over the layer's runtime cache like ``cached_attention`` and, in
the same pass over the keys, adds each slot's score contribution (accumulated attention, optionally
Gumbel-regularised with a temperature schedule) to the per-slot state ``SCORES`` that the eviction
policy ranks slots by. The schedule and the noise seed are op arguments, so a graph carries them.
"""

from __future__ import annotations

import torch

from tokenpass.ir.op_registry import register_attention_op

SCORED_ATTENTION = "tokenpass::scored_attention"
SCORES = "kvevict.scores"  # per-slot accumulated score, [B, H_kv, S] fp32
PROMPT_END = "kvevict.prompt_end"  # cache note: the sequence length when the prompt ended

torch.library.define(
    SCORED_ATTENTION,
    "(Tensor query, Tensor key_new, Tensor value_new, float scale, int layer, float? softcap=None, int window=0, "
    "bool noise=False, float tau_init=1.0, float tau_end=1.0, int tau_horizon=0, int seed=0) -> Tensor",
)


@torch.library.register_fake(SCORED_ATTENTION)
def _scored_attention_fake(query, key_new, value_new, scale, layer, softcap=None, window=0, noise=False,
                           tau_init=1.0, tau_end=1.0, tau_horizon=0, seed=0):
    return query.new_empty((*query.shape[:-1], value_new.shape[-1]))


scored_attention_op = torch.ops.tokenpass.scored_attention.default
register_attention_op(scored_attention_op, {"query": "query", "key": "key_new", "value": "value_new", "scale": "scale",
                                            "layer": "layer", "softcap": "softcap", "window": "window"},
                      reads_runtime_cache=True)
