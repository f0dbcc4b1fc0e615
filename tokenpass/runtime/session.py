"""A generation session: one batch's cache, the graphs that run on it, and the policies between steps.

This is the one step loop of the runtime: ``generate``, the bench's teacher-forced loop and anything
else that feeds tokens step by step call ``Session.step``, so whatever a method does between steps
(declared as policies on its graphs) happens in every caller alike.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tokenpass.errors import TokenpassError
from tokenpass.ir.capture import ModelSpec
from tokenpass.ir.graph import TokenGraph
from tokenpass.runtime.compiled import CompiledSteps
from tokenpass.runtime.executor import check_step_device, run_step
from tokenpass.runtime.guards import guarded
from tokenpass.runtime.kv_cache import KVCache
from tokenpass.runtime.policy import Policy, Step


def phase_of(input_ids: torch.Tensor) -> str:
    """One-token steps run the decode graph, longer ones the prefill graph."""
    return "decode" if input_ids.shape[1] == 1 else "prefill"


class Session:
    """Steps over the runtime-owned ``KVCache`` (graphs lowered by ``lower_kv_cache``); with ``compiled``,
    each step runs its bucket's compiled module (``runtime/compiled.py``) instead of the graph's own."""

    def __init__(self, graphs: Mapping[str, TokenGraph], cache: KVCache, policies: list[Policy],
                 compiled: CompiledSteps | None = None):
        self.graphs, self.cache, self.policies, self.compiled = graphs, cache, policies, compiled

    def step(self, input_ids: torch.Tensor, token_valid: torch.Tensor, position_ids: torch.Tensor,
             last_only: bool = False) -> torch.Tensor:
        """Run ``input_ids`` ``[B, T]`` on top of the cache (extended in place), then every policy;
        returns logits ``[B, T, V]`` (``[B, 1, V]`` with ``last_only`` when the graph allows it)."""
        phase = phase_of(input_ids)
        logits = self.run(phase, input_ids, token_valid, position_ids, last_only)
        after_step(self, Step(phase, input_ids, token_valid, position_ids))
        return logits

    def run(self, phase: str, input_ids: torch.Tensor, token_valid: torch.Tensor, position_ids: torch.Tensor,
            last_only: bool = False) -> torch.Tensor:
        """One step of ``phase``'s graph without policies (what policies themselves call)."""
        graph = self.graphs[phase]
        module = self.compiled.module_for(graph, input_ids) if self.compiled is not None else None
        with guarded(graph, input_ids):
            return run_step(graph, self.cache, input_ids, token_valid, position_ids, last_only, module)


class GraphCache:
    """The cache of graphs that were not lowered: the captured step's own past/present tensors, on the
    model's device, with the mask over them. ``outputs``: the last step's extra output groups
    (``ir/step_outputs.py``), by group, one tensor per layer, for the session's explicit policies."""

    def __init__(self, spec: ModelSpec, batch: int):
        self.keys, self.values = spec.empty_cache(batch)
        self.mask = torch.zeros((batch, 0), dtype=torch.long, device=spec.device)
        self.outputs: dict[str, list[torch.Tensor]] = {}

    def commit(self, mask: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
               groups: list[str], extras: list[list[torch.Tensor]]) -> None:
        """What a step returned becomes the cache (only once the step ran)."""
        if len(extras) != len(groups):
            raise TokenpassError(f"the step returned {len(extras)} extra output groups, expected {groups}")
        self.keys, self.values, self.mask = list(keys), list(values), mask
        self.outputs = dict(zip(groups, extras))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class ExplicitSession:
    """Steps over graphs that carry their cache as explicit past/present tensors (not lowered); the
    graphs' policies must be ones that act on such a cache (``Policy.explicit``)."""

    def __init__(self, graphs: Mapping[str, TokenGraph], spec: ModelSpec, batch: int,
                 policies: list[Policy] | None = None):
        self.graphs, self.spec, self.cache = graphs, spec, GraphCache(spec, batch)
        self.policies = check_explicit(policies or [])

    def step(self, input_ids: torch.Tensor, token_valid: torch.Tensor, position_ids: torch.Tensor,
             last_only: bool = False) -> torch.Tensor:
        check_step_device(self.spec, input_ids=input_ids, token_valid=token_valid, position_ids=position_ids)
        cache = self.cache
        mask = torch.cat([cache.mask, token_valid.long()], dim=1)
        graph = self.graphs[phase_of(input_ids)]
        with guarded(graph, input_ids), torch.no_grad():
            logits, keys, values, *extras = graph(input_ids, mask, position_ids, cache.keys, cache.values)
        cache.commit(mask, keys, values, graph.step_outputs, extras)
        after_step(self, Step(phase_of(input_ids), input_ids, token_valid, position_ids))
        return logits


def check_explicit(policies: list[Policy]) -> list[Policy]:
    """``policies``, if each acts on an explicit cache; else one line naming the first that does not."""
    for policy in policies:
        if not policy.explicit:
            raise TokenpassError(f"run-time policy '{policy.name}' acts on the runtime's KV cache; lower the graphs "
                                 "(lower=True) to run it")
    return policies


def after_step(session, step: Step) -> None:
    """Every policy of ``session``, in order, on the step that just ran."""
    for policy in session.policies:
        policy.after_step(session, step)
