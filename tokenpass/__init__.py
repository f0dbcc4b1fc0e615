"""tokenpass: graph-rewriting passes that make causal LMs spend less per token."""

from tokenpass import methods, passes  # noqa: F401 - registers built-in and method passes
from tokenpass.api import TokenpassWarning, capture, optimize
from tokenpass.errors import CaptureError, PassError, PassOrderError, TokenpassError
from tokenpass.finetune import finetune
from tokenpass.ir.graph import TokenGraph
from tokenpass.methods.cutcrossentropy import CutCrossEntropy
from tokenpass.methods.h2o import H2O
from tokenpass.methods.keyformer import Keyformer
from tokenpass.methods.skipdecode import SkipDecode
from tokenpass.methods.streamingllm import StreamingLLM
from tokenpass.methods.tidaldecode import TidalDecode
from tokenpass.methods.tokenselect import TokenSelect
from tokenpass.models import load, tiny
from tokenpass.onnx_export import ExportError, export_onnx
from tokenpass.onnx_optimize import optimize_onnx
from tokenpass.runtime.onnx_session import OnnxModel

__all__ = [
    "CaptureError",
    "CutCrossEntropy",
    "ExportError",
    "H2O",
    "Keyformer",
    "OnnxModel",
    "PassError",
    "PassOrderError",
    "SkipDecode",
    "StreamingLLM",
    "TokenGraph",
    "TokenpassError",
    "TidalDecode",
    "TokenSelect",
    "TokenpassWarning",
    "capture",
    "export_onnx",
    "finetune",
    "load",
    "optimize",
    "optimize_onnx",
    "tiny",
]
__version__ = "0.1.0"
