"""Turn a causal LM into graphs with ``torch.export`` (non-strict), the KV cache explicit in each.

A decoder's Python forward branches on whether it is decoding one token (mask creation takes a
shortcut when the query length is 1), so one trace cannot cover both phases. We therefore capture two
programs of the same step function, as serving runtimes do:

* ``prefill``: ``T >= 2`` new tokens on top of a past of any length (0 included);
* ``decode``: exactly one new token on top of a past of any length.

Each step takes ``(input_ids [B,T], attention_mask [B,P+T], position_ids [B,T], past_keys[L],
past_values[L])`` with past tensors ``[B, H_kv, P, D]`` and returns ``(logits [B,T,V], present_keys[L],
present_values[L])``. Because the past and present caches are graph inputs and outputs, passes can see
and rewrite every cache read and update, and ONNX export can carry them.

Nothing here is per-architecture: the cache layout (layers, KV heads, head dim) is learnt by running
the model once on two tokens and reading the cache it returns.

Capture happens on the model's own device and dtype (``model_device``): the probe, the traced sample
inputs and therefore every device the exported programs record (``aten.arange(..., device=...)`` in
mask code) follow the weights, and ``ModelSpec`` carries both to the runtime, which allocates the KV
cache and every buffer there.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx.experimental._config as fx_config
from torch import nn

from tokenpass.errors import CaptureError
from tokenpass.ir.trace_diff import first_difference

PHASES: tuple[str, ...] = ("prefill", "decode")
STEP_ARGS: tuple[str, ...] = ("input_ids", "attention_mask", "position_ids", "past_keys", "past_values")
SAMPLE_BATCH = 2  # rows of the traced sample: not 1, so that no op specialises the program to a single row
# The forward's KV-cache keyword: transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name
# is a deprecated alias there); plain modules written against either are accepted.
CACHE_ARGUMENTS: tuple[str, ...] = ("cache", "past_key_values")


@dataclass(frozen=True)
class ModelSpec:
    """What capture learnt about the model: enough to build caches and sample inputs.

    ``dtype`` is that of the KV cache the model returns (its compute dtype, whatever its logits' dtype);
    ``device`` is where its weights live. Caches and sample inputs are made on that device and dtype.
    """

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None
    dtype: torch.dtype
    layer_windows: tuple[int, ...] = ()  # per layer: sliding-window size, 0 for full attention
    device: torch.device = torch.device("cpu")

    def window(self, layer: int) -> int:
        """Layer ``layer``'s sliding window (0: it sees every earlier position)."""
        return self.layer_windows[layer] if layer < len(self.layer_windows) else 0

    def empty_cache(self, batch: int, length: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Zero past keys and values of ``length`` positions for every layer, on the model's device."""
        shape = (batch, self.num_kv_heads, length, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        return keys, values


class CausalLMStep(nn.Module):
    """One forward step of a causal LM with the KV cache as plain tensors in and out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.cache_argument = cache_argument(model)

    def forward(self, input_ids, attention_mask, position_ids, past_keys, past_values):
        from transformers import DynamicCache

        cache = DynamicCache()
        for keys, values in zip(past_keys, past_values):
            cache.layers.append(_preloaded_layer(keys, values))
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_argument: cache},
        )
        layers = returned_cache(out).layers
        return out.logits, [layer.keys for layer in layers], [layer.values for layer in layers]


def _preloaded_layer(keys: torch.Tensor, values: torch.Tensor):
    """A cache layer holding ``keys``/``values`` as they are (no copy, unlike a first ``update``)."""
    from transformers.cache_utils import DynamicLayer

    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer


def cache_argument(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache by (``cache`` or ``past_key_values``)."""
    params = inspect.signature(model.forward).parameters
    found = [name for name in CACHE_ARGUMENTS if name in params]
    if not found:
        raise CaptureError(
            f"{type(model).__name__} is not a causal LM: its forward takes no KV cache (neither "
            f"{' nor '.join(CACHE_ARGUMENTS)}; expected forward(input_ids, attention_mask, position_ids, "
            "past_key_values, use_cache))"
        )
    return found[0]


def returned_cache(out: object) -> object:
    """The KV cache a forward returned, under either name its output class gives it."""
    for name in CACHE_ARGUMENTS:
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    raise AttributeError(f"{type(out).__name__} carries no KV cache ({' or '.join(CACHE_ARGUMENTS)})")


def check_causal_lm(model: nn.Module) -> None:
    """Refuse, in one line, a module whose forward is not shaped like a causal LM's."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if "input_ids" not in inspect.signature(model.forward).parameters:
        raise CaptureError(
            f"{type(model).__name__} is not a causal LM: its forward lacks input_ids "
            "(expected forward(input_ids, attention_mask, position_ids, past_key_values, use_cache))"
        )
    cache_argument(model)


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Run ``model`` in eval mode (dropout off, as inference sees it); see ``module_mode``."""
    return module_mode(model, training=False)


@contextlib.contextmanager
def module_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Run ``model`` in train or eval mode and give every submodule back its own ``training`` flag
    afterwards: capturing a model must not change the caller's module."""
    flags = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s weights live (its first parameter or buffer; CPU for a module with neither), as
    HF's ``model.device`` reads it. A model split across devices is driven from its first one."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def probe(model: nn.Module, name: str) -> ModelSpec:
    """Run the model once on two tokens, on its own device, and read the cache layout it produces."""
    check_causal_lm(model)
    ids = torch.zeros((1, 2), dtype=torch.long, device=model_device(model))
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        logits, cache = out.logits, returned_cache(out)
        layers = cache.layers
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a causal LM we can drive"
        raise CaptureError(f"{type(model).__name__} is not a causal LM tokenpass can drive: {_first_line(exc)}")
    if not layers or logits.dim() != 3:
        raise CaptureError(f"{type(model).__name__} returned no KV cache or logits of rank {logits.dim()} (need 3)")
    keys = layers[0].keys
    _, kv_heads, _, head_dim = keys.shape
    config = getattr(model, "config", None)
    return ModelSpec(
        name=name,
        num_layers=len(layers),
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        vocab_size=int(logits.shape[-1]),
        max_positions=getattr(config, "max_position_embeddings", None),
        dtype=keys.dtype,
        layer_windows=layer_windows(config, len(layers)),
        device=keys.device,
    )


def layer_windows(config, num_layers: int) -> tuple[int, ...]:
    """Each layer's sliding window from the HF config conventions (``sliding_window`` with
    ``layer_types``, ``use_sliding_window``); 0 for full attention. The lowering checks these against
    the masks the graph really computes, so a config that lies cannot make the runtime wrong."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return (0,) * num_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return (int(window),) * num_layers
    return tuple(int(window) if kind == "sliding_attention" else 0 for kind in list(layer_types)[:num_layers])


def sample_inputs(spec: ModelSpec, phase: str, batch: int = 2, past: int = 3, new: int = 4) -> tuple:
    """Inputs of one step with left padding on row 0, used for export and for numerical checks.

    Drawn on CPU from a seeded generator (the same values whatever the device; a CPU generator cannot
    fill CUDA tensors), then moved to the model's device, in its dtype.
    """
    new = 1 if phase == "decode" else new
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (batch, new), generator=generator)
    mask = torch.ones((batch, past + new), dtype=torch.long)
    mask[0, : min(2, past + new - 1)] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    shape = (batch, spec.num_kv_heads, past, spec.head_dim)
    keys = [torch.randn(shape, generator=generator, dtype=spec.dtype) for _ in range(spec.num_layers)]
    values = [torch.randn(shape, generator=generator, dtype=spec.dtype) for _ in range(spec.num_layers)]
    device = spec.device
    return (ids.to(device), mask.to(device), positions.to(device), [k.to(device) for k in keys],
            [v.to(device) for v in values])


def _dynamic_shapes(spec: ModelSpec, phase: str, dynamic_batch: bool = True) -> dict:
    dyn = torch.export.Dim.DYNAMIC
    batch = {0: dyn} if dynamic_batch else {}
    tokens = batch if phase == "decode" else {**batch, 1: dyn}
    cache = [{**batch, 2: dyn}] * spec.num_layers
    return {
        "input_ids": tokens,
        "attention_mask": {**batch, 1: dyn},
        "position_ids": tokens,
        "past_keys": cache,
        "past_values": cache,
    }


def export_phase(model: nn.Module, spec: ModelSpec, phase: str) -> torch.export.ExportedProgram:
    """Export one phase's step; failures become one-line ``CaptureError`` naming model and phase.

    The program must run on any batch, 1-row batches included (single-prompt generation); see
    ``admit_one_row_batches`` for the guards some models' tracing records against them.
    """
    if phase not in PHASES:
        raise CaptureError(f"unknown phase '{phase}': choose one of {PHASES}")
    with eval_mode(model):
        step = CausalLMStep(model).eval()
        program = _trace(step, spec, phase, batch=SAMPLE_BATCH)
        admit_one_row_batches(step, spec, phase, program)
    return program


def _trace(
    step: CausalLMStep, spec: ModelSpec, phase: str, batch: int, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``step`` on sample inputs of ``batch`` rows (batch dim static unless ``dynamic_batch``)."""
    # Size-oblivious tracing keeps the batch and past dims valid down to 0 and 1 (a 1-row batch, an
    # empty past) instead of specialising the program to the sample's sizes.
    try:
        with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
            return torch.export.export(
                step,
                sample_inputs(spec, phase, batch=batch),
                dynamic_shapes=_dynamic_shapes(spec, phase, dynamic_batch),
                strict=False,
            )
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types; the user needs one line
        raise CaptureError(f"cannot capture {spec.name} ({phase} step) with torch.export: {_first_line(exc)}")


def admit_one_row_batches(
    step: CausalLMStep, spec: ModelSpec, phase: str, program: torch.export.ExportedProgram
) -> None:
    """Make ``program`` (traced on a 2-row batch) accept 1-row batches, or refuse in one line.

    Size-oblivious tracing avoids most 0/1 specialisation, but an op's own kernel can still guard on a
    size being 1. Falcon's attention reshapes a strided slice of its fused QKV projection; ATen's reshape
    asks whether that tensor is contiguous (a view or a copy), and dims of size 1 are skipped in that test,
    so the trace records ``batch != 1``. ``ExportedProgram.module()`` turns such guards into an assertion
    on the inputs, which would reject every single-prompt ``generate``. Range constraints do not show
    them (``!=`` is not a range), so we evaluate the guards on a 1-row sample. When some fail, the step is
    traced again at batch 1: if that trace computes the same ops on the same data, the 2-row program
    computes the same thing at batch 1 (the guard only fixed a choice the recorded op remakes at run
    time, here view or copy) and the failing guards are dropped; otherwise capture refuses.
    """
    floor = batch_floor(program)
    if floor > 1:
        raise CaptureError(
            f"cannot capture {spec.name} ({phase} step) for 1-row batches: "
            f"its program requires input_ids dim 0 (batch) >= {floor}"
        )
    violated = one_row_violations(program, spec, phase)
    if not violated:
        return
    refusal = (
        f"cannot capture {spec.name} ({phase} step) for 1-row batches (input dim 0): "
        f"the trace at batch {SAMPLE_BATCH} guards on {readable_guard(violated[0])}"
    )
    try:
        single = _trace(step, spec, phase, batch=1, dynamic_batch=False)
    except CaptureError as exc:
        raise CaptureError(f"{refusal}, and tracing at batch 1 fails ({str(exc).split(': ', 1)[-1]})") from None
    difference = first_difference(program.graph, single.graph)
    if difference is not None:
        raise CaptureError(
            f"{refusal}, and the model computes differently at batch 1 (batch {SAMPLE_BATCH} vs 1: {difference})"
        )
    program._guards_code = [code for code in program._guards_code if code not in violated]


def batch_floor(program: torch.export.ExportedProgram) -> int:
    """The least batch size the program's range constraints admit (its inputs' dim 0)."""
    user_inputs = set(program.graph_signature.user_inputs)
    floor = 0
    for node in program.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" and node.name in user_inputs else None
        if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0], torch.SymInt):
            bounds = program.range_constraints.get(val.shape[0].node.expr)
            floor = max(floor, int(bounds.lower)) if bounds is not None else floor
    return floor


def one_row_violations(program: torch.export.ExportedProgram, spec: ModelSpec, phase: str) -> list[str]:
    """The program's input guards that a 1-row step (all other sizes as traced) violates."""
    scope = {"L": dict(zip(STEP_ARGS, sample_inputs(spec, phase, batch=1)))}
    return [code for code in getattr(program, "_guards_code", []) if not _holds(code, scope)]


def _holds(code: str, scope: dict) -> bool:
    """Evaluate one guard of ``ExportedProgram._guards_code`` (a Python expression over ``L[input]``)."""
    names = {"math": math, "torch": torch, "__builtins__": {}}
    try:
        return bool(eval(code, names, scope))  # noqa: S307 - torch's own guard text, over our sample inputs
    except Exception:  # noqa: BLE001 - a guard we cannot evaluate is left in place
        return True


def readable_guard(code: str) -> str:
    """``L['input_ids'].size()[0] != 1`` -> ``input_ids.size()[0] != 1`` (how guard failures name inputs)."""
    return re.sub(r"L\['(\w+)'\]", r"\1", code)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__
