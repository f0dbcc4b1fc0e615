"""``TokenGraph``: a thin wrapper over one ``torch.export.ExportedProgram`` that passes rewrite in place.

It adds what passes and tools need and the exported program lacks: the semantic sites (recomputed
after every change), a runnable module kept in step with the graph, an op histogram, the signature
with symbolic dims, and provenance for rewritten nodes (``node.meta["tokenpass"]``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import fx

import tokenpass.ir.ops  # noqa: F401 - registers tokenpass:: ops so saved programs load
from tokenpass.errors import CaptureError
from tokenpass.ir.capture import ModelSpec
from tokenpass.ir.op_registry import lookup_attention
from tokenpass.ir.requests import PolicySpec, SlotState
from tokenpass.ir.sites import GraphSites, find_sites, op_histogram
from tokenpass.ir.step_outputs import append_output_group
from tokenpass.ir.visualize import dataflow

# What every freshly captured or loaded graph guarantees before any pass runs (pass orders are checked
# against this before capture starts).
CAPTURED_PROPERTIES: frozenset[str] = frozenset({"captured"})


class TokenGraph:
    """One captured step (``prefill`` or ``decode``) of a model, or a program loaded from disk."""

    def __init__(self, program: torch.export.ExportedProgram, phase: str | None = None, spec: ModelSpec | None = None):
        self.program = program
        self.phase = phase
        self.spec = spec
        self.version = 0
        self._sites: GraphSites | None = None
        self._module: torch.nn.Module | None = None
        self.properties: set[str] = set(CAPTURED_PROPERTIES)
        # What method passes ask of the runtime, as plain data (see ``ir/requests.py``).
        self.slot_states: list[SlotState] = []
        self.policies: list[PolicySpec] = []
        # Per-layer output groups returned after the caches, for policies (see ``ir/step_outputs.py``).
        self.step_outputs: list[str] = []

    @property
    def graph(self) -> fx.Graph:
        return self.program.graph_module.graph

    @property
    def label(self) -> str:
        name = self.spec.name if self.spec else "program"
        return f"{name}/{self.phase}" if self.phase else name

    def node(self, name: str) -> fx.Node:
        for node in self.graph.nodes:
            if node.name == name:
                return node
        raise KeyError(f"{self.label} has no node named '{name}'")

    def node_names(self) -> set[str]:
        return {n.name for n in self.graph.nodes}

    def mark_changed(self) -> None:
        """Call after mutating the graph: recompiles it and drops derived views."""
        self.graph.lint()
        self.program.graph_module.recompile()
        self.version += 1
        self._sites = None
        self._module = None

    def sites(self) -> GraphSites:
        if self._sites is None:
            self._sites = find_sites(self.graph)
        return self._sites

    def module(self) -> torch.nn.Module:
        """A runnable module of the current graph (parameters shared with the program, not copied)."""
        if self._module is None:
            self._module = self.program.module()
        return self._module

    def __call__(self, *inputs):
        with torch.no_grad():
            return self.module()(*inputs)

    def reads_runtime_cache(self) -> bool:
        """Whether some attention op reads the runtime-owned KV cache (the graph then runs only inside
        the runtime: ``tokenpass.runtime.executor.run_captured``)."""
        return any(lookup_attention(n) is not None and lookup_attention(n).reads_runtime_cache for n in self.graph.nodes)

    def declare_slot_state(self, state: SlotState) -> None:
        """Ask the runtime cache to keep ``state`` (declaring the same state again is a no-op)."""
        if state not in self.slot_states:
            self.slot_states = [*[s for s in self.slot_states if s.name != state.name], state]

    def add_policy(self, policy: PolicySpec) -> None:
        """Ask the runtime to run ``policy`` between steps (one policy per name: a new one replaces it)."""
        self.policies = [*[p for p in self.policies if p.name != policy.name], policy]

    def add_output_group(self, group: str, nodes: list[fx.Node]) -> None:
        """Return ``nodes`` (one per layer) after the step's caches, as ``group`` (a policy reads them)."""
        if group in self.step_outputs:
            raise CaptureError(f"{self.label} already returns the output group {group!r}")
        append_output_group(self.program, nodes)
        self.step_outputs.append(group)
        self.mark_changed()

    def to_networkx(self):
        """The dataflow as a ``networkx.DiGraph`` (one node per fx node, an edge per use) for analysis."""
        return dataflow(self.graph)

    def op_histogram(self) -> Counter:
        return op_histogram(self.graph)

    def num_parameters(self) -> int:
        """Elements of the program's parameters, each tensor counted once: tied weights (an LM head
        sharing the embedding matrix) are one tensor under two names."""
        names = self.program.graph_signature.parameters or list(self.program.state_dict)
        tensors = [self.program.state_dict.get(name) for name in names]
        seen: set[tuple] = set()
        total = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
            if key not in seen:
                seen.add(key)
                total += t.numel()
        return total

    def signature(self) -> dict[str, list[dict]]:
        """User inputs and outputs with dtype and (symbolic) shape."""
        user_inputs = set(self.program.graph_signature.user_inputs)
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
        (out,) = [n for n in self.graph.nodes if n.op == "output"]
        outputs = [n for n in torch.utils._pytree.tree_leaves(out.args[0]) if isinstance(n, fx.Node)]
        return {"inputs": [_describe(n) for n in placeholders], "outputs": [_describe(n) for n in outputs]}

    def save(self, path: str | Path) -> None:
        torch.export.save(self.program, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "TokenGraph":
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # noqa: BLE001 - any failure means "not a saved exported program"
            raise CaptureError(f"{path} is not a saved torch.export program: {type(exc).__name__}: {exc}") from None
        return cls(program)


def _describe(node: fx.Node) -> dict:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return {"name": node.name, "dtype": str(val.dtype).replace("torch.", ""), "shape": [str(d) for d in val.shape]}
    return {"name": node.name, "dtype": None, "shape": None}
