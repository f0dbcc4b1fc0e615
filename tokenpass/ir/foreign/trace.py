"""Standard-ONNX bodies for tokenpass's ops inside someone else's ONNX graph.

The translations in ``ir/onnx_translations.py`` and each method's ``onnx_translation.py`` are onnxscript
code that torch's exporter traces while it exports our own graphs. A foreign ``.onnx`` file never goes
through that exporter, so its rewrites trace the same translations here, with the exporter's own
recorder (an onnxscript evaluator that records ``onnx_ir`` nodes), into model-local ONNX functions in
the ``tokenpass`` domain: one arithmetic, whichever way a graph reached ONNX. torch is pinned below
2.14, and the recorder is the one ``torch.onnx.export`` itself runs, so the two never drift apart.

A translation reads its constant options (scale, soft cap, mask kind) as Python values and emits only
the ops they need, so each distinct option set is its own function, told apart by the ONNX function
``overload`` (``tokenpass.Attention`` overload ``f32_additive_s0.125``...).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import onnx_ir as ir

DOMAIN = "tokenpass"
DOMAIN_VERSION = 1
MIN_IR_VERSION = 10  # function overloads


def function_inputs(values: Sequence[ir.Value | None], names: Sequence[str]) -> list[ir.Value]:
    """Fresh function parameters typed like the call's arguments (absent optional ones are left out)."""
    return [ir.Value(name=name, type=value.type, shape=value.shape)
            for value, name in zip(values, names) if value is not None]


def trace_function(translation: Callable, name: str, arguments: Sequence[ir.Value | None], names: Sequence[str],
                   options: dict, opset: int) -> ir.Function:
    """``translation(*arguments, **options)`` traced into a ``tokenpass`` function of ``opset`` ops; the
    overload is a digest of the options and argument types and shapes, so equal calls share one function."""
    import onnxscript
    from torch.onnx._internal.exporter._building import OpRecorder

    params = function_inputs(arguments, names)
    traced_args, it = [], iter(params)
    for value in arguments:
        traced_args.append(None if value is None else next(it))
    recorder = OpRecorder(onnxscript.values.Opset("", opset), {})
    with onnxscript.evaluator.default_as(recorder):
        outputs = translation(*traced_args, **options)
    outputs = list(outputs) if isinstance(outputs, tuple | list) else [outputs]
    for i, out in enumerate(outputs):
        out.name = f"output_{i}"
    body = ir.Graph(params, outputs, nodes=recorder.nodes, opset_imports={"": opset}, name=name)
    return ir.Function(DOMAIN, name, _overload(options, arguments), graph=body, attributes=[])


def _overload(options: dict, arguments: Sequence[ir.Value | None]) -> str:
    """What the trace decided from: the options and the arguments' types and shapes (a translation may
    branch on a static head count)."""
    key = repr(sorted(options.items())) + repr([None if a is None else f"{a.dtype}{a.shape}" for a in arguments])
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def call_function(model: ir.Model, function: ir.Function, arguments: Sequence[ir.Value | None],
                  before: ir.Node, metadata: dict[str, str]) -> ir.Node:
    """A node calling ``function`` (registered in ``model``) on ``arguments``, inserted before ``before``;
    ``metadata`` (the op's options as text) rides on the node for later passes and ``tokenpass inspect``."""
    register_function(model, function)
    node = ir.Node(DOMAIN, function.name, [a for a in arguments if a is not None], overload=function.overload,
                   num_outputs=len(function.outputs), metadata_props=dict(metadata))
    for out, template in zip(node.outputs, function.outputs):
        out.type = template.type or out.type  # dims are the caller's to state: the body's symbols are its own
    before.graph.insert_before(before, node)
    return node


def register_function(model: ir.Model, function: ir.Function) -> None:
    """``function`` among ``model``'s local functions (kept if an equal one is there), the ``tokenpass``
    domain imported, and an IR version that has function overloads."""
    model.functions.setdefault(function.identifier(), function)
    model.opset_imports.setdefault(DOMAIN, DOMAIN_VERSION)
    model.ir_version = max(model.ir_version or 0, MIN_IR_VERSION)


def has_calls(model: ir.Model, names: tuple[str, ...]) -> bool:
    """Whether ``model``'s graph already calls one of the ``tokenpass`` functions ``names`` (a rewrite that
    made them ran before)."""
    return any(n.domain == DOMAIN and n.op_type in names for n in model.graph)
