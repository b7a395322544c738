"""Tracing one component to ONNX, finishing the file, and the checks an export must pass.

Finishing means: the LinearAttention function and opset import attached, each LinearAttention
node named after the UNet module it replaces, per-node stack traces and other exporter
metadata stripped, and weights in ``model.onnx_data`` beside ``model.onnx`` when the model is
too large for one protobuf.
"""

from __future__ import annotations

import ast
import logging
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from linfusion.runtime.contract import ops

from .attention_op import function_proto, routed_to_custom_op, translation_table
from .components import Component

logger = logging.getLogger(__name__)

EXTERNAL_DATA_NAME = "model.onnx_data"
EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of weights; protobuf's hard limit is 2 GiB
SUPPORTED_OPSETS = range(18, 24)


class ExportCheckError(RuntimeError):
    """An exported file failed a check; the export is abandoned."""


def trace(component: Component, opset: int) -> tuple[ir.Model, int]:
    """Dynamo-export ``component`` with symbolic batch and spatial axes; returns (model, routed layers)."""
    generator = torch.Generator().manual_seed(0)
    args = component.make_inputs(2, *component.trace_size, generator)
    with routed_to_custom_op(component.module) as routed, torch.no_grad():
        program = torch.onnx.export(
            component.module.eval(), args, dynamo=True, opset_version=opset,
            input_names=[t.name for t in component.inputs],
            output_names=[t.name for t in component.outputs],
            dynamic_shapes=component.dynamic_shapes(),
            custom_translation_table=translation_table(), optimize=True, verbose=False)
    return program.model, routed


def finish(model: ir.Model, opset: int) -> int:
    """Attach the function, name the attention nodes, strip metadata; returns the node count."""
    count = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain == ops.DOMAIN and node.op_type == ops.LINEAR_ATTENTION:
            count += 1
            node.name = _module_name(node) or f"linear_attention_{count}"
        node.metadata_props.clear()
        node.doc_string = None
    if count:
        function = ir.serde.deserialize_function(function_proto(opset))
        model.functions[function.identifier()] = function
        model.opset_imports[ops.DOMAIN] = ops.DOMAIN_VERSION
    model.graph.metadata_props.clear()
    model.doc_string = None
    return count


def _module_name(node: ir.Node) -> str | None:
    """The UNet module path, from the exporter's name scopes (wrapper prefix removed)."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    try:
        names = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    attn = next((s for s in reversed(names) if s.endswith("attn1")), None)
    return attn.split(".", 1)[1] if attn and "." in attn else attn


def save(model: ir.Model, path: Path) -> str | None:
    """Save, with external data when the weights are large; returns the data file name or None."""
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                  if v.const_value is not None)
    external = EXTERNAL_DATA_NAME if weights > EXTERNAL_DATA_THRESHOLD else None
    ir.save(model, path, external_data=external)
    return external


def check(path: Path, providers: list[str] | None = None) -> None:
    """onnx.checker (path-based, so files over 2 GB work), strict shape inference, an ORT session."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ExportCheckError(f"{path}: onnx.checker failed: {str(exc).splitlines()[0]}") from exc
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        inferred = Path(tmp) / "inferred.onnx"
        try:
            onnx.shape_inference.infer_shapes_path(str(path), str(inferred), strict_mode=True,
                                                   data_prop=True)
        except Exception as exc:  # onnx raises InferenceError or RuntimeError with a long message
            raise ExportCheckError(f"{path}: shape inference failed: {str(exc).splitlines()[0]}") from exc
    try:
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ort.InferenceSession(str(path), session_options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportCheckError(f"{path}: ONNX Runtime cannot load it: {str(exc).splitlines()[0]}") from exc


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize
