"""Linear attention as one ONNX node per layer: ``linfusion::LinearAttention``.

Each layer becomes a single node with inputs q, k, v shaped [B, N, H*d] and attributes
``heads``, ``eps``, ``plugin_namespace`` and ``plugin_version``. The model also carries an
ONNX local function of the same name whose body is standard opset-18 ops, so ONNX Runtime and
TensorRT without the plugin inline it, while TensorRT's parser substitutes the registered
plugin for a node that carries ``plugin_namespace``.

The function body reads N from the run-time shape and computes the scale and the reductions in
float32 even in an fp16 model (an fp16 N overflows at 65536 tokens and zeroes the output).

Route: a ``torch.library`` custom op with a fake implementation is translated through
``custom_translation_table`` to the opaque node; the FunctionProto is attached after export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx
import onnxscript
import torch
from linfusion.runtime.contract import ops
from linfusion.runtime.contract.attention_onnx import linear_attention_function
from onnx import defs

from linfusion.attention import GeneralizedLinearAttention, linear_attention


@torch.library.custom_op("linfusion::linear_attention", mutates_args=())
def linear_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        eps: float) -> torch.Tensor:
    return linear_attention(q, k, v, heads, eps)


@linear_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    return torch.empty_like(q)


def register_schema() -> None:
    """Declare the op to onnx so that onnxscript can emit it (idempotent)."""
    if defs.has(ops.LINEAR_ATTENTION, ops.DOMAIN_VERSION, ops.DOMAIN):
        return
    param = defs.OpSchema.FormalParameter
    attr = defs.OpSchema.Attribute
    kinds = defs.OpSchema.AttrType
    defs.register_schema(defs.OpSchema(
        ops.LINEAR_ATTENTION, ops.DOMAIN, ops.DOMAIN_VERSION,
        doc="LinFusion generalized linear attention on projected q, k, v [B, N, heads*d].",
        inputs=[param("q", "T"), param("k", "T"), param("v", "T")],
        outputs=[param("out", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=[attr("heads", kinds.INT, "number of heads"),
                    attr("eps", kinds.FLOAT, "added to the normaliser"),
                    attr("plugin_namespace", kinds.STRING, "TensorRT plugin namespace"),
                    attr("plugin_version", kinds.STRING, "TensorRT plugin version")]))


def translate(q, k, v, heads: int, eps: float):
    """custom_translation_table entry: the opaque node that TensorRT can map to its plugin."""
    opset = onnxscript.values.Opset(ops.DOMAIN, ops.DOMAIN_VERSION)
    return getattr(opset, ops.LINEAR_ATTENTION)(q, k, v, heads=heads, eps=eps, plugin_namespace=ops.PLUGIN_NAMESPACE,
                                                plugin_version=ops.PLUGIN_VERSION)


def translation_table() -> dict:
    register_schema()
    return {torch.ops.linfusion.linear_attention.default: translate}


@contextlib.contextmanager
def routed_to_custom_op(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, every LinFusion layer computes its core through the custom op.

    Yields the number of layers routed. The instance attribute shadows the class method and is
    removed on exit, so the eager model is unchanged afterwards.
    """
    layers = [m for m in model.modules() if isinstance(m, GeneralizedLinearAttention)]
    for layer in layers:
        layer.core = (lambda lyr: lambda q, k, v: torch.ops.linfusion.linear_attention(
            q, k, v, lyr.heads, float(lyr.eps)))(layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.core


def function_proto(opset: int = 18) -> onnx.FunctionProto:
    """The standard-op body of LinearAttention (the contract's one builder)."""
    return linear_attention_function(opset)
