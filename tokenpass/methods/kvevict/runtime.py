"""Runtime implementation of ``scored_attention`` over the active KV cache: on CUDA decode steps the Triton
decode kernel (which returns its scores from its one pass over K) plus the score's finishing softmax;
elsewhere the torch reference.

It stages like every cache op (``staged``), attends, and adds the step's score contribution to the
layer's ``SCORES`` state. Prefill scores come from every prompt query at ``tau_init``; a decode step
at index ``i`` after the prompt uses the schedule's temperature for ``i``.
"""

from __future__ import annotations

import torch

from tokenpass.kernels.cache_attention_ref import step_mask, windowed_step_mask
from tokenpass.kernels.scored_attention_ref import score_contribution, scored_attention_reference, temperature
from tokenpass.methods.kvevict.ops import PROMPT_END, SCORED_ATTENTION, SCORES
from tokenpass.runtime.context import active_cache
from tokenpass.runtime.ops import count_read, staged


@torch.library.impl(SCORED_ATTENTION, "CompositeExplicitAutograd")
def scored_attention(query, key_new, value_new, scale, layer, softcap=None, window=0, noise=False, tau_init=1.0,
                     tau_end=1.0, tau_horizon=0, seed=0):
    cache = active_cache()
    keys, values, valid = staged(layer, key_new, value_new, window)
    count_read(keys, values)
    slots, t = keys.shape[2], query.shape[2]
    slot_positions = cache.layers[layer].positions[:, :, :slots]
    mask = valid
    if t > 1:
        mask = (windowed_step_mask(valid, slot_positions, cache.step_positions, window) if window
                else step_mask(valid, t, slots, query.device))
        tau = tau_init
    else:
        tau = temperature(tau_init, tau_end, cache.sequence_length - int(cache.notes.get(PROMPT_END, 0)), tau_horizon)
    if query.is_cuda and t == 1:  # the decode kernel returns its scores from its one pass over K
        from tokenpass.kernels.decode_attention import decode_attention

        out, scores = decode_attention(query, keys, values, valid, scale, return_scores=True, softcap=softcap)
        contribution = score_contribution(scores[:, :, :, None], tau, noise, seed, layer, cache.step_positions,
                                          slot_positions)
    else:
        out, contribution = scored_attention_reference(
            query, keys, values, mask, scale, query_valid=cache.step_valid, query_positions=cache.step_positions,
            slot_positions=slot_positions, tau=tau, noise=noise, seed=seed, layer=layer, softcap=softcap)
    cache.state(layer, SCORES)[:, :, :slots] += contribution
    return out.contiguous()
