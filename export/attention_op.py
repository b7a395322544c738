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
from onnx import TensorProto, defs
from onnx import helper as oh

from linfusion.attention import GeneralizedLinearAttention, linear_attention
from linfusion.runtime.manifest import LINEAR_ATTENTION_DOMAIN, LINEAR_ATTENTION_OP

DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "linfusion"
PLUGIN_VERSION = "1"
ATTRIBUTES = ("heads", "eps", "plugin_namespace", "plugin_version")


@torch.library.custom_op("linfusion::linear_attention", mutates_args=())
def linear_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        eps: float) -> torch.Tensor:
    return linear_attention(q, k, v, heads, eps)


@linear_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    return torch.empty_like(q)


def register_schema() -> None:
    """Declare the op to onnx so that onnxscript can emit it (idempotent)."""
    if defs.has(LINEAR_ATTENTION_OP, DOMAIN_VERSION, LINEAR_ATTENTION_DOMAIN):
        return
    param = defs.OpSchema.FormalParameter
    attr = defs.OpSchema.Attribute
    kinds = defs.OpSchema.AttrType
    defs.register_schema(defs.OpSchema(
        LINEAR_ATTENTION_OP, LINEAR_ATTENTION_DOMAIN, DOMAIN_VERSION,
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
    opset = onnxscript.values.Opset(LINEAR_ATTENTION_DOMAIN, DOMAIN_VERSION)
    return opset.LinearAttention(q, k, v, heads=heads, eps=eps, plugin_namespace=PLUGIN_NAMESPACE,
                                 plugin_version=PLUGIN_VERSION)


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
    """The standard-op body of LinearAttention, computed in float32 whatever the I/O type."""
    nodes: list[onnx.NodeProto] = []

    def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> None:
        nodes.append(oh.make_node(op, inputs, outputs, **attrs))

    def constant_from_attribute(output: str, attr_field: str, kind: int, ref: str) -> None:
        proto = oh.make_node("Constant", [], [output])
        proto.attribute.append(onnx.AttributeProto(name=attr_field, type=kind, ref_attr_name=ref))
        nodes.append(proto)

    node("Constant", [], ["axis_0"], value_ints=[0])
    node("Constant", [], ["axis_1"], value_ints=[1])
    node("Constant", [], ["axis_2"], value_ints=[2])
    node("Constant", [], ["index_1"], value_int=1)
    node("Constant", [], ["minus_1"], value_ints=[-1])
    node("Constant", [], ["one"], value_float=1.0)
    constant_from_attribute("heads_scalar", "value_int", onnx.AttributeProto.INT, "heads")
    constant_from_attribute("eps_value", "value_float", onnx.AttributeProto.FLOAT, "eps")
    node("Reshape", ["heads_scalar", "axis_1"], ["heads_1d"])
    node("Shape", ["q"], ["shape"])
    node("Slice", ["shape", "axis_0", "axis_2"], ["batch_tokens"])
    node("Concat", ["batch_tokens", "heads_1d", "minus_1"], ["split_shape"], axis=0)
    for x in ("q", "k", "v"):  # [B, N, H*d] -> float32 [B, H, N, d]
        node("Cast", [x], [f"{x}_f32"], to=TensorProto.FLOAT)
        node("Reshape", [f"{x}_f32", "split_shape"], [f"{x}_split"])
        node("Transpose", [f"{x}_split"], [f"{x}_heads"], perm=[0, 2, 1, 3])
    for x in ("q", "k"):  # phi = elu + 1
        node("Elu", [f"{x}_heads"], [f"{x}_elu"], alpha=1.0)
        node("Add", [f"{x}_elu", "one"], [f"{x}_phi"])
    # N from the run-time shape, in float32: scale = N^-1/2.
    node("Gather", ["shape", "index_1"], ["tokens"], axis=0)
    node("Cast", ["tokens"], ["tokens_f32"], to=TensorProto.FLOAT)
    node("Sqrt", ["tokens_f32"], ["sqrt_tokens"])
    node("Reciprocal", ["sqrt_tokens"], ["scale"])
    # z = phi(q) . mean_N phi(k) + eps
    node("ReduceMean", ["k_phi", "axis_2"], ["k_mean"], keepdims=1)
    node("Transpose", ["k_mean"], ["k_mean_t"], perm=[0, 1, 3, 2])
    node("MatMul", ["q_phi", "k_mean_t"], ["z_raw"])
    node("Add", ["z_raw", "eps_value"], ["z"])
    # kv = (phi(k)^T N^-1/2)(v N^-1/2)
    node("Transpose", ["k_phi"], ["k_phi_t"], perm=[0, 1, 3, 2])
    node("Mul", ["k_phi_t", "scale"], ["k_scaled"])
    node("Mul", ["v_heads", "scale"], ["v_scaled"])
    node("MatMul", ["k_scaled", "v_scaled"], ["kv"])
    node("MatMul", ["q_phi", "kv"], ["numerator"])
    node("Div", ["numerator", "z"], ["out_heads"])
    node("Transpose", ["out_heads"], ["out_split"], perm=[0, 2, 1, 3])
    node("Concat", ["batch_tokens", "minus_1"], ["merge_shape"], axis=0)
    node("Reshape", ["out_split", "merge_shape"], ["out_f32"])
    node("CastLike", ["out_f32", "q"], ["out"])
    return oh.make_function(LINEAR_ATTENTION_DOMAIN, LINEAR_ATTENTION_OP, ["q", "k", "v"], ["out"],
                            nodes, opset_imports=[oh.make_opsetid("", opset)],
                            attributes=list(ATTRIBUTES),
                            doc_string="LinFusion linear attention; N read at run time, float32 inside.")
