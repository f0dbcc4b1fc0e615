"""Reading a foreign ``.onnx`` file: a missing, truncated or corrupt file, or an opset outside what the
rewrites emit, is one ``CaptureError`` line naming the file, never a protobuf traceback."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from tokenpass.errors import CaptureError
from tokenpass.ir.onnx_bridge import load_onnx

# The function bodies are written in opset-18 ops (torch's ONNX library); their meaning is unchanged up
# to 23, the newest opset onnxruntime runs here. Below 18, ReduceMax/ReduceSum take their axes differently.
MIN_OPSET, MAX_OPSET = 18, 23


def load_model(path: str | Path) -> ir.Model:
    """The model at ``path`` as ``onnx_ir``, checked (ONNX's checker) and of a supported opset."""
    proto = load_onnx(path)
    model = ir.serde.deserialize_model(proto)
    opset = default_opset(model)
    if opset is None:
        raise CaptureError(f"{path} imports no default ONNX opset: it is not a decoder of standard ops")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise CaptureError(f"{path} uses ONNX opset {opset}; tokenpass rewrites opsets {MIN_OPSET}-{MAX_OPSET} "
                           f"(re-export with opset_version={MIN_OPSET} or newer, or convert it with "
                           "onnx.version_converter)")
    return model


def default_opset(model: ir.Model) -> int | None:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
