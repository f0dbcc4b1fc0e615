"""The ONNX runtime: an exported model's prefill and decode steps run by stock onnxruntime.

An export (``tokenpass/onnx_export.py``) is a directory holding ``prefill.onnx``, ``decode.onnx`` and
``tokenpass_onnx.json`` (the ``ModelSpec`` and what produced the files). Each step takes the KV cache as
explicit ``past_keys_<l>``/``past_values_<l>`` inputs and returns ``present_*`` outputs, as the captured
torch steps do, so this runtime keeps the cache between steps exactly as the torch runtime's explicit
session does; ``OnnxModel`` shares the prompt checks and the generation loop with ``OptimizedModel``
(``StepModel``), so both runtimes answer the same prompt through the same code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tokenpass.errors import CaptureError, TokenpassError
from tokenpass.ir.capture import PHASES, ModelSpec
from tokenpass.ir.requests import PolicySpec
from tokenpass.runtime.policy import Policy, Step, build_policies
from tokenpass.runtime.session import GraphCache, after_step, check_explicit, phase_of
from tokenpass.runtime.step_model import StepModel

MANIFEST = "tokenpass_onnx.json"
MANIFEST_FORMAT = 1
NUMPY_DTYPES = (torch.float32, torch.float16)


def phase_file(phase: str) -> str:
    return f"{phase}.onnx"


def output_names(num_layers: int, groups: list[str] = ()) -> list[str]:
    """The step's outputs in the order the captured program returns them: logits, the caches, then each
    extra group's per-layer tensors (``ir/step_outputs.py``) as ``<group>_<layer>``."""
    return (["logits"] + [f"present_keys_{i}" for i in range(num_layers)]
            + [f"present_values_{i}" for i in range(num_layers)]
            + [f"{group}_{i}" for group in groups for i in range(num_layers)])


@dataclass
class OnnxManifest:
    """What an export directory holds: the model's ``ModelSpec`` (cache layout) and how the files were made."""

    spec: dict  # ModelSpec's fields, the dtype by name; the device is onnxruntime's business
    passes: list[str] = field(default_factory=list)
    opset: int | None = None
    format: int = MANIFEST_FORMAT
    changes: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # step -> pass -> counts
    policies: list[dict] = field(default_factory=list)  # {"name": ..., "options": {...}}: run between steps
    outputs: dict[str, list[str]] = field(default_factory=dict)  # step -> its extra output groups

    @classmethod
    def of(cls, spec: ModelSpec, passes: list[str], opset: int | None,
           changes: dict[str, dict[str, dict[str, int]]] | None = None, policies: list[PolicySpec] = (),
           outputs: dict[str, list[str]] | None = None) -> "OnnxManifest":
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "device"}
        fields.update(dtype=str(spec.dtype).removeprefix("torch."), layer_windows=list(spec.layer_windows))
        return cls(fields, passes, opset, changes=changes or {},
                   policies=[{"name": p.name, "options": p.kwargs()} for p in dict.fromkeys(policies)],
                   outputs=outputs or {})

    def policy_specs(self) -> list[PolicySpec]:
        """The policies, their options as written (JSON lists back to the tuples they were: hashable)."""
        return [PolicySpec.of(p["name"], **{k: tuple(v) if isinstance(v, list) else v for k, v in p["options"].items()})
                for p in self.policies]

    def model_spec(self) -> ModelSpec:
        """The ``ModelSpec`` the runtime builds caches from (on the CPU, where the numpy arrays live)."""
        return ModelSpec(**{**self.spec, "dtype": getattr(torch, self.spec["dtype"]),
                            "layer_windows": tuple(self.spec["layer_windows"])})

    def write(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, directory: Path) -> "OnnxManifest":
        path = directory / MANIFEST
        if not path.is_file():
            raise CaptureError(f"{directory} is not a tokenpass ONNX export: {MANIFEST} is missing "
                               "(make one with tokenpass.export_onnx or 'tokenpass export')")
        try:
            manifest = cls(**json.loads(path.read_text()))
            manifest.model_spec()
            manifest.policy_specs()
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise CaptureError(f"{path} is not a valid tokenpass manifest: {exc}") from None
        if manifest.format != MANIFEST_FORMAT:
            raise CaptureError(f"{path} has format {manifest.format}; this tokenpass reads format {MANIFEST_FORMAT}")
        return manifest


def open_session(path: Path, providers: list[str] | None):
    """An onnxruntime session over ``path``; a file onnxruntime cannot load is one line naming it."""
    import onnxruntime as ort

    if not path.is_file():
        raise CaptureError(f"{path}: no such file (an export holds {', '.join(phase_file(p) for p in PHASES)})")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime warns about every unused initializer
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own many kinds; the user needs one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CaptureError(f"onnxruntime cannot load {path}: {first}") from None


class OnnxSession:
    """Steps over onnxruntime sessions; the cache (``GraphCache``, on the CPU: numpy views of its tensors
    are fed without a copy) goes out as ``past_*`` and comes back as ``present_*``, the extra output
    groups as the explicit session gets them, and the export's policies run after each step."""

    def __init__(self, sessions: dict, spec: ModelSpec, batch: int, policies: list[Policy],
                 outputs: dict[str, list[str]]):
        self.sessions, self.spec, self.cache = sessions, spec, GraphCache(spec, batch)
        self.policies, self.outputs = check_explicit(policies), outputs

    def step(self, input_ids: torch.Tensor, token_valid: torch.Tensor, position_ids: torch.Tensor,
             last_only: bool = False) -> torch.Tensor:
        cache, layers, phase = self.cache, self.spec.num_layers, phase_of(input_ids)
        mask = torch.cat([cache.mask, token_valid.long()], dim=1)
        feeds = {"input_ids": input_ids.long().numpy(), "attention_mask": mask.numpy(),
                 "position_ids": position_ids.long().numpy()}
        feeds.update({f"past_keys_{i}": k.contiguous().numpy() for i, k in enumerate(cache.keys)})
        feeds.update({f"past_values_{i}": v.contiguous().numpy() for i, v in enumerate(cache.values)})
        logits, *present = (torch.from_numpy(a) for a in self.sessions[phase].run(None, feeds))
        groups = self.outputs.get(phase, [])
        extras = [present[2 * layers + g * layers: 2 * layers + (g + 1) * layers] for g in range(len(groups))]
        cache.commit(mask, present[:layers], present[layers:2 * layers], groups, extras)
        after_step(self, Step(phase, input_ids, token_valid, position_ids))
        return logits


class OnnxModel(StepModel):
    """An ONNX export run by onnxruntime, with ``OptimizedModel``'s ``__call__`` and ``generate``."""

    def __init__(self, directory: str | Path, providers: list[str] | None = None):
        self.directory = Path(directory)
        self.manifest = OnnxManifest.read(self.directory)
        self.spec = self.manifest.model_spec()
        if self.spec.dtype not in NUMPY_DTYPES:
            raise TokenpassError(f"{self.directory}: the ONNX runtime holds the cache as numpy arrays, which have no "
                                 f"{self.manifest.spec['dtype']}; export the model in float32 or float16")
        self.sessions = {phase: open_session(self.directory / phase_file(phase), providers) for phase in PHASES}

    def session(self, batch: int, capacity: int = 64, budget: int | None = None) -> OnnxSession:
        if budget is not None:
            raise TokenpassError("kv_budget at generation time needs the torch runtime's cache; to bound the ONNX "
                                 "runtime's cache, export it with a KV eviction pass")
        return OnnxSession(self.sessions, self.spec, batch, build_policies(self.manifest.policy_specs()),
                           self.manifest.outputs)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(input_ids, attention_mask, position_ids)
