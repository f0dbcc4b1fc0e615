"""The ONNX side of the IR: load an ``.onnx`` file safely and describe what it computes.

Attention in ONNX appears either as a fused op (``Attention``, ``MultiHeadAttention``,
``GroupQueryAttention``) or as ``MatMul -> (scale/mask ops) -> Softmax -> MatMul``; both are counted
as attention sites.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tokenpass.errors import CaptureError
from tokenpass.ir.foreign.trace import DOMAIN

FUSED_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
OWN_DOMAIN = DOMAIN  # model-local functions tokenpass's exports and rewrites call
_BETWEEN_SCORES_AND_SOFTMAX = {"Add", "Div", "Mul", "Where", "Cast", "Reshape", "Transpose", "Tanh"}
# Between the probabilities and the value product: torch's exported SDPA zeroes NaN rows (IsNaN/Where),
# tokenpass's attention zeroes rows with no key left (Where).
_BETWEEN_SOFTMAX_AND_VALUES = {"Where", "Cast", "Reshape"}


def load_onnx(path: str | Path):
    """Load and check an ONNX model; any defect becomes one ``CaptureError`` line naming the file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise CaptureError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        if not (_UNREGISTERED in str(exc) and _onnxruntime_loads(path)):
            raise CaptureError(f"{path} is not a valid ONNX model: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - protobuf errors vary; the user needs one line
        raise CaptureError(f"{path} is not a valid ONNX model: {type(exc).__name__}: {_first_line(exc)}") from None
    return model


# onnxruntime registers some of its ops in the standard domain (SimplifiedLayerNormalization, which
# onnxruntime-genai's builder writes); ONNX's checker does not know them, onnxruntime runs them.
_UNREGISTERED = "No Op registered for"


def _onnxruntime_loads(path: Path) -> bool:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any failure means the checker's complaint stands
        return False
    return True


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _dims(value_info) -> list[str]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in shape.dim]


def _softmax_attention(nodes) -> list[str]:
    producer = {out: n for n in nodes for out in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for inp in n.input:
            consumers.setdefault(inp, []).append(n)
    sites = []
    for n in nodes:
        if n.op_type != "Softmax":
            continue
        src = producer.get(n.input[0])
        while src is not None and src.op_type in _BETWEEN_SCORES_AND_SOFTMAX:
            src = producer.get(src.input[1 if src.op_type == "Where" else 0])  # Where(keep, scores, fill)
        if src is not None and src.op_type == "MatMul" and _reaches_matmul(n.output[0], consumers):
            sites.append(n.name or n.output[0])
    return sites


def _reaches_matmul(value: str, consumers: dict[str, list], hops: int = 3) -> bool:
    """Whether ``value`` feeds a MatMul directly or through a few row-fixing ops."""
    for node in consumers.get(value, []):
        if node.op_type == "MatMul":
            return True
        passes_on = hops and node.op_type in _BETWEEN_SOFTMAX_AND_VALUES
        if passes_on and _reaches_matmul(node.output[0], consumers, hops - 1):
            return True
    return False


def _own_functions(model) -> list[dict]:
    """The ``tokenpass`` functions the file defines: name, overload, body size and how often it is called."""
    calls = Counter((n.op_type, n.overload) for n in model.graph.node if n.domain == OWN_DOMAIN)
    return [{"function": f"{OWN_DOMAIN}.{f.name}", "overload": f.overload, "body_nodes": len(f.node),
             "calls": calls[(f.name, f.overload)]} for f in model.functions if f.domain == OWN_DOMAIN]


def _own_sites(model) -> list[dict]:
    """Calls of ``tokenpass`` functions: attention sites a rewrite made, with the layer in their metadata."""
    sites = []
    for node in model.graph.node:
        if node.domain == OWN_DOMAIN:
            meta = {p.key: p.value for p in node.metadata_props}
            sites.append({"node": node.name, "op": f"{OWN_DOMAIN}.{node.op_type}",
                          "onnx_layer": int(meta.get("tokenpass.layer", len(sites)))})
    return sites


def summarize_onnx(model) -> dict:
    """Parameters, op histogram, attention sites and I/O with symbolic dims of an ONNX model."""
    import numpy as np
    from onnx import TensorProto, helper

    graph = model.graph
    nodes = list(graph.node)
    initializers = {i.name for i in graph.initializer}
    fused = [n.name or n.output[0] for n in nodes if n.op_type in FUSED_ATTENTION and n.domain != OWN_DOMAIN]
    attention = [{"node": name} for name in fused + _softmax_attention(nodes)] + _own_sites(model)
    io = lambda values: [  # noqa: E731
        {"name": v.name, "dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
         if v.type.tensor_type.elem_type != TensorProto.UNDEFINED else None, "shape": _dims(v)}
        for v in values if v.name not in initializers
    ]
    return {
        "format": "onnx",
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "parameters": int(sum(int(np.prod(i.dims)) for i in graph.initializer)),
        "num_layers": len(attention),
        "attention_sites": attention,
        "functions": _own_functions(model),
        "op_histogram": dict(Counter(n.op_type for n in nodes).most_common()),
        "inputs": io(graph.input),
        "outputs": io(graph.output),
    }
