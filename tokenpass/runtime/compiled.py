"""Compiled steps: the lowered prefill and decode graphs through ``torch.compile`` (Inductor), per shape bucket.

Why this is possible at all: the runtime owns the KV cache, so a lowered step's inputs have shapes that
do not grow with the context. The cache-reading ops (``tokenpass::cached_attention`` and the ops methods
register with ``reads_runtime_cache``) stay opaque: Dynamo records them as calls with their fake implementations,
Inductor emits a fallback call to the registered implementation, and that implementation looks the
active cache up in ``runtime/context.py``'s ContextVar at run time, as in eager mode (the compiled
code runs in the caller's thread and context). They need no mutation annotation: each op stages and
reads only its own layer's cache, nothing else in the graph reads the cache, and layer ``l + 1``'s
inputs are computed from layer ``l``'s output, so data dependencies already fix their order; each
output is used, so none is dead code. They do have to return the strides their fakes declare
(contiguous), which Inductor asserts.

What is compiled, keyed by ``Bucket``:

- decode: one compiled module per batch size, static shapes (``[B, 1]`` ids; the past inputs are
  always empty). On CUDA it runs under CUDA graphs (``triton.cudagraphs``), split around the
  cache-reading ops (Inductor graph partitions), which run eagerly between the captured pieces: their
  implementations read the cache's current length and flags in Python, which a replayed graph would
  freeze. The cache lives outside the graphs, so its capacity is no part of the key and growing it
  never recompiles. UNTESTED: no GPU was available when this was written.
- prefill: one compiled module for every batch size and prompt length (both dims dynamic, traced
  size-obliviously like the captured program, so batch 1 needs no recompilation of its own), no CUDA
  graphs.

``cpp_wrapper=True`` has Inductor emit the code that calls a step's kernels in C++ instead of Python.
A decode step makes hundreds of kernel and library calls; on a small CPU the Python wrapper costs ~3 ms of
a ~39 ms SmolLM2 step, which the C++ wrapper saves (36 ms measured), at the price of a much longer
first compilation (about 100 s instead of 5 s for SmolLM2's decode step on 2 cores; Inductor's on-disk
cache serves later processes). Off by default for that reason.

Every bucket is its own module object (sharing the graph's parameters), so Dynamo's per-code-object
cache never mixes buckets nor hits its recompile limit. Each bucket's first call (tracing, Inductor's
code generation, the C++ or Triton build, one run) is timed and recorded in a ``CompileReport``; a later
compilation in a bucket (a Dynamo guard failed) is counted as a recompile, never hidden.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tokenpass.errors import TokenpassError
from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.op_registry import runtime_cache_ops

DYNAMIC_PHASES = ("prefill",)  # compiled once for any batch and length; other phases once per batch size


@dataclass(frozen=True)
class Bucket:
    """What one compiled module serves: a phase, a batch size (``None``: any) and a device type."""

    phase: str
    batch: int | None
    device: str

    @property
    def label(self) -> str:
        batch = "any batch" if self.batch is None else f"batch {self.batch}"
        return f"{self.phase} ({batch}, {self.device})"


@dataclass(frozen=True)
class CompileEntry:
    """The first call of one bucket: what compiling it cost."""

    bucket: Bucket
    first_call_s: float  # wall time of the first call: tracing, Inductor, the C++/Triton build, one run
    inductor_s: float  # of which inside Inductor (code generation and build; a cache hit is fast)
    graphs: int  # graphs Inductor compiled in that call (1: the step compiled whole, no graph break)
    cache_hits: int  # of those, served from Inductor's on-disk FX graph cache (an earlier process built it)
    cudagraphs: bool

    def to_dict(self) -> dict:
        return {"phase": self.bucket.phase, "batch": self.bucket.batch, "device": self.bucket.device,
                "label": self.bucket.label, "first_call_s": self.first_call_s, "inductor_s": self.inductor_s,
                "graphs": self.graphs, "cache_hits": self.cache_hits, "cudagraphs": self.cudagraphs}


@dataclass
class CompileReport:
    """Every compilation of one model's steps: one entry per bucket, plus recompilations inside a bucket."""

    entries: list[CompileEntry] = field(default_factory=list)
    recompiles: int = 0  # compilations after a bucket's first call (Dynamo guards that failed)
    recompile_s: float = 0.0

    @property
    def compilations(self) -> int:
        """Graphs Inductor compiled in all (first calls and recompilations)."""
        return sum(entry.graphs for entry in self.entries) + self.recompiles

    def seconds(self) -> float:
        """What compiling cost the caller: every bucket's first call, plus recompilations."""
        return sum(entry.first_call_s for entry in self.entries) + self.recompile_s

    def to_dict(self) -> dict:
        return {"compile_s": self.seconds(), "compilations": self.compilations, "recompiles": self.recompiles,
                "buckets": [entry.to_dict() for entry in self.entries]}

    def lines(self) -> list[str]:
        """One human-readable line per bucket."""
        return [f"{e.bucket.label}: first call {e.first_call_s:.1f} s (Inductor {e.inductor_s:.1f} s, "
                f"{e.graphs} graph(s), {e.cache_hits} from cache{', CUDA graphs' if e.cudagraphs else ''})"
                for e in self.entries] + ([f"recompiles: {self.recompiles} ({self.recompile_s:.1f} s)"]
                                          if self.recompiles else [])


def bucket_of(phase: str, input_ids: torch.Tensor) -> Bucket:
    """The bucket a step of ``phase`` on ``input_ids`` ``[B, T]`` runs in."""
    batch = None if phase in DYNAMIC_PHASES else int(input_ids.shape[0])
    return Bucket(phase, batch, input_ids.device.type)


def uses_cudagraphs(bucket: Bucket) -> bool:
    """CUDA graphs only for static-shape steps on CUDA; the CPU path never takes them."""
    return bucket.device == "cuda" and bucket.batch is not None


def inductor_options(bucket: Bucket, cpp_wrapper: bool = False) -> dict:
    """Inductor config for ``bucket``: on CUDA decode, CUDA graphs with the graph split around every op
    that reads the runtime cache (those run eagerly; see the module docstring); ``cpp_wrapper`` asks for
    the C++ wrapper. Empty on CPU by default."""
    options: dict = {"cpp_wrapper": True} if cpp_wrapper else {}
    if uses_cudagraphs(bucket):
        options |= {"triton.cudagraphs": True, "graph_partition": True,
                    "custom_should_partition_ops": sorted(str(spec.op._schema.name) for spec in runtime_cache_ops())}
    return options


class _Counter:
    """A Dynamo backend that hands graphs to Inductor and counts them and the time spent there."""

    def __init__(self, options: dict):
        self.options, self.graphs, self.seconds = options, 0, 0.0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence) -> Callable:
        import torch._inductor

        start = time.perf_counter()
        try:
            return torch._inductor.compile(gm, list(example_inputs), options=dict(self.options))
        finally:
            self.graphs += 1
            self.seconds += time.perf_counter() - start


def _size_oblivious(enabled: bool) -> contextlib.AbstractContextManager:
    """Trace dynamic dims size-obliviously, as the capture did, so a compilation made at batch 2 also serves
    batch 1 and one-token prompts (Dynamo otherwise specialises sizes 0 and 1). A private torch setting
    (2.13); where it is missing, batch 1 merely recompiles once (counted in the report)."""
    from torch.fx.experimental import _config as shape_config

    if not enabled or not hasattr(shape_config, "backed_size_oblivious"):
        return contextlib.nullcontext()
    return shape_config.patch(backed_size_oblivious=True)


def _cache_hits() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_hit"])


def _packed(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with row-major strides: Dynamo guards on strides, so a prompt sliced from a longer tensor
    (``[1, 8]`` with stride 12 is "contiguous", yet not packed) must not recompile the step."""
    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.append(step)
        step *= size
    if tensor.stride() == tuple(reversed(strides)):
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device).copy_(tensor)


class CompiledStep:
    """One bucket's compiled module, called like ``TokenGraph.module()`` by ``executor.run_step``."""

    def __init__(self, graph: TokenGraph, bucket: Bucket, report: CompileReport, cpp_wrapper: bool = False):
        self.bucket, self.report, self.version = bucket, report, graph.version
        self.backend = _Counter(inductor_options(bucket, cpp_wrapper))
        dynamic = bucket.batch is None
        # A module of its own (parameters shared with the program): its own Dynamo cache entries.
        self.module = torch.compile(graph.program.module(), backend=self.backend, fullgraph=True,
                                    dynamic=None if dynamic else False)
        self.called = False

    def __call__(self, input_ids, attention_mask, position_ids, past_keys, past_values):
        args = [_packed(t) for t in (input_ids, attention_mask, position_ids)]
        if not self.called:
            return self._first_call(args, past_keys, past_values)
        before = self.backend.graphs
        start = time.perf_counter()
        outputs = self._run(args, past_keys, past_values)
        if self.backend.graphs != before:
            self.report.recompiles += self.backend.graphs - before
            self.report.recompile_s += time.perf_counter() - start
        return outputs

    def _first_call(self, args: list[torch.Tensor], past_keys, past_values):
        if self.bucket.batch is None:
            # Marks stick to tensors: mark copies of the caller's; the empty past tensors are run_step's own
            # (one tensor repeated, an aliasing Dynamo guards on, so they are marked as they are).
            args = [tensor.clone() for tensor in args]
            for tensor in args:
                torch._dynamo.mark_dynamic(tensor, [0, 1])
            for tensor in [*past_keys, *past_values]:
                torch._dynamo.mark_dynamic(tensor, 0)
        hits, start = _cache_hits(), time.perf_counter()
        try:
            with _size_oblivious(self.bucket.batch is None):
                outputs = self._run(args, past_keys, past_values)
        except TokenpassError:
            raise
        except Exception as exc:  # noqa: BLE001 - any compiler failure: name the step, keep the cause
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise TokenpassError(f"compiling the {self.bucket.label} step failed ({type(exc).__name__}: {first}); "
                                 "run it without compile=True") from exc
        self.called = True
        self.report.entries.append(CompileEntry(self.bucket, time.perf_counter() - start, self.backend.seconds,
                                                self.backend.graphs, _cache_hits() - hits,
                                                uses_cudagraphs(self.bucket)))
        return outputs

    def _run(self, args: list[torch.Tensor], past_keys, past_values):
        if not uses_cudagraphs(self.bucket):
            return self.module(*args, past_keys, past_values)
        # CUDA graphs reuse their output buffers on the next replay: start a new step and hand out copies.
        torch.compiler.cudagraph_mark_step_begin()
        outputs = self.module(*args, past_keys, past_values)
        return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, outputs)


class CompiledSteps:
    """The compiled modules of one model's lowered graphs, made on first use per bucket, and their report."""

    def __init__(self, graphs: Mapping[str, TokenGraph], cpp_wrapper: bool = False):
        unlowered = [graph.label for graph in graphs.values() if not graph.reads_runtime_cache()]
        if unlowered:
            raise TokenpassError(f"compiling needs graphs lowered onto the runtime KV cache; {', '.join(unlowered)} "
                                 "is not (see the lower_kv_cache reports)")
        self.graphs, self.cpp_wrapper = graphs, cpp_wrapper
        self.report = CompileReport()
        self._steps: dict[Bucket, CompiledStep] = {}

    def module_for(self, graph: TokenGraph, input_ids: torch.Tensor) -> CompiledStep:
        """The compiled module to run ``graph`` on ``input_ids`` with (compiled now if its bucket is new, or
        if the graph changed since)."""
        bucket = bucket_of(graph.phase or "step", input_ids)
        step = self._steps.get(bucket)
        if step is None or step.version != graph.version:
            step = self._steps[bucket] = CompiledStep(graph, bucket, self.report, self.cpp_wrapper)
        return step

    @property
    def buckets(self) -> list[Bucket]:
        return list(self._steps)
