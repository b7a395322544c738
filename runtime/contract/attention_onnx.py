"""The standard-op ONNX bodies of the linear-attention op and of its three plugin ops.

One builder for both: the exporter attaches ``linear_attention_function`` to every export (ONNX
Runtime and TensorRT without the plugin inline it), and the engine tests attach
``plugin_reference_functions`` to a rewritten graph to prove the State/Reduce/Apply split.
Every body reads N from the run-time shape and computes in float32 whatever the I/O type (an
fp16 N overflows at 65536 tokens and zeroes the output).

Needs ``onnx``: imported by ``linfusion.export`` and ``linfusion.engines`` only, never by the
runtime's generation path.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto
from onnx import helper as oh

from . import ops


def _from_attribute(output: str, field: str, kind: int, ref: str) -> onnx.NodeProto:
    """A Constant whose value is the calling node's attribute ``ref``."""
    proto = oh.make_node("Constant", [], [output])
    proto.attribute.append(onnx.AttributeProto(name=field, type=kind, ref_attr_name=ref))
    return proto


def _common() -> list[onnx.NodeProto]:
    return [oh.make_node("Constant", [], ["one"], value_float=1.0),
            oh.make_node("Constant", [], ["axis_0"], value_ints=[0]),
            oh.make_node("Constant", [], ["axis_1"], value_ints=[1]),
            oh.make_node("Constant", [], ["axis_2"], value_ints=[2]),
            oh.make_node("Constant", [], ["minus_1"], value_ints=[-1])]


def _heads() -> list[onnx.NodeProto]:
    return [_from_attribute("heads_scalar", "value_int", onnx.AttributeProto.INT, "heads"),
            oh.make_node("Reshape", ["heads_scalar", "axis_1"], ["heads_1d"])]


def _eps() -> onnx.NodeProto:
    return _from_attribute("eps_value", "value_float", onnx.AttributeProto.FLOAT, "eps")


def _split_heads(x: str) -> list[onnx.NodeProto]:
    """[B, N, H*d] -> float32 [B, H, N, d] as ``{x}_heads``; ``{x}_bn`` holds [B, N]."""
    return [oh.make_node("Shape", [x], [f"{x}_shape"]),
            oh.make_node("Slice", [f"{x}_shape", "axis_0", "axis_2"], [f"{x}_bn"]),
            oh.make_node("Concat", [f"{x}_bn", "heads_1d", "minus_1"], [f"{x}_split_shape"], axis=0),
            oh.make_node("Cast", [x], [f"{x}_f32"], to=TensorProto.FLOAT),
            oh.make_node("Reshape", [f"{x}_f32", f"{x}_split_shape"], [f"{x}_split"]),
            oh.make_node("Transpose", [f"{x}_split"], [f"{x}_heads"], perm=[0, 2, 1, 3])]


def _phi(x: str) -> list[onnx.NodeProto]:
    """phi = elu + 1, as ``{x}_phi``."""
    return [oh.make_node("Elu", [f"{x}_heads"], [f"{x}_elu"], alpha=1.0),
            oh.make_node("Add", [f"{x}_elu", "one"], [f"{x}_phi"])]


def _merge_heads(heads: str, like: str) -> list[onnx.NodeProto]:
    """float32 [B, H, N, d] -> [B, N, H*d] in ``like``'s dtype, as ``out``."""
    return [oh.make_node("Transpose", [heads], ["out_split"], perm=[0, 2, 1, 3]),
            oh.make_node("Concat", [f"{like}_bn", "minus_1"], ["merge_shape"], axis=0),
            oh.make_node("Reshape", ["out_split", "merge_shape"], ["out_f32"]),
            oh.make_node("CastLike", ["out_f32", like], ["out"])]


def _tokens(phi: str) -> list[onnx.NodeProto]:
    """N from the run-time shape of ``phi`` [B, H, N, d], as float32 ``tokens_f32`` [1]."""
    return [oh.make_node("Shape", [phi], [f"{phi}_shape"]),
            oh.make_node("Gather", [f"{phi}_shape", "axis_2"], ["tokens_1d"], axis=0),
            oh.make_node("Cast", ["tokens_1d"], ["tokens_f32"], to=TensorProto.FLOAT)]


def _function(name: str, inputs: list[str], outputs: list[str], nodes: list[onnx.NodeProto], opset: int,
              attributes: list[str], doc: str = "") -> onnx.FunctionProto:
    return oh.make_function(ops.DOMAIN, name, inputs, outputs, nodes,
                            opset_imports=[oh.make_opsetid("", opset)], attributes=attributes, doc_string=doc)


def linear_attention_function(opset: int = 18) -> onnx.FunctionProto:
    """The body of ``linfusion::LinearAttention(q, k, v)``: kv = (phi(k)^T N^-1/2)(v N^-1/2),
    z = phi(q) . mean_N phi(k) + eps, out = phi(q) kv / z."""
    nodes = [*_common(), *_heads(), _eps(), *_split_heads("q"), *_split_heads("k"), *_split_heads("v"),
             *_phi("q"), *_phi("k"), *_tokens("k_phi"),
             oh.make_node("Sqrt", ["tokens_f32"], ["sqrt_tokens"]),
             oh.make_node("Reciprocal", ["sqrt_tokens"], ["scale"]),
             oh.make_node("ReduceMean", ["k_phi", "axis_2"], ["k_mean"], keepdims=1),
             oh.make_node("Transpose", ["k_mean"], ["k_mean_t"], perm=[0, 1, 3, 2]),
             oh.make_node("MatMul", ["q_phi", "k_mean_t"], ["z_raw"]),
             oh.make_node("Add", ["z_raw", "eps_value"], ["z"]),
             oh.make_node("Transpose", ["k_phi"], ["k_phi_t"], perm=[0, 1, 3, 2]),
             oh.make_node("Mul", ["k_phi_t", "scale"], ["k_scaled"]),
             oh.make_node("Mul", ["v_heads", "scale"], ["v_scaled"]),
             oh.make_node("MatMul", ["k_scaled", "v_scaled"], ["kv"]),
             oh.make_node("MatMul", ["q_phi", "kv"], ["numerator"]),
             oh.make_node("Div", ["numerator", "z"], ["out_heads"]),
             *_merge_heads("out_heads", "q")]
    return _function(ops.LINEAR_ATTENTION, ["q", "k", "v"], ["out"], nodes, opset, list(ops.ATTRIBUTES),
                     "LinFusion linear attention; N read at run time, float32 inside.")


def plugin_reference_functions(opset: int = 18) -> list[onnx.FunctionProto]:
    """Standard-op bodies of the three plugin ops with one token split (S = 1), which satisfies
    the plugins' contract (``ops``). For running a rewritten graph in ONNX Runtime; never put
    into a file TensorRT parses (an older parser would inline them instead of the plugins)."""
    state = _function(ops.STATE, ["k", "v"], ["partials"], [
        *_common(), *_heads(), *_split_heads("k"), *_split_heads("v"), *_phi("k"), *_tokens("k_phi"),
        oh.make_node("Transpose", ["k_phi"], ["k_phi_t"], perm=[0, 1, 3, 2]),
        oh.make_node("MatMul", ["k_phi_t", "v_heads"], ["kv_sum"]),
        oh.make_node("ReduceSum", ["k_phi", "axis_2"], ["k_sum"], keepdims=1),
        oh.make_node("Transpose", ["k_sum"], ["k_sum_t"], perm=[0, 1, 3, 2]),
        oh.make_node("Concat", ["kv_sum", "k_sum_t"], ["both"], axis=-1),
        oh.make_node("Div", ["both", "tokens_f32"], ["scaled"]),
        oh.make_node("Unsqueeze", ["scaled", "axis_2"], ["partials"]),
    ], opset, ["heads", *ops.PLUGIN_ATTRIBUTES])
    reduce = _function(ops.REDUCE, ["partials"], ["state"], [
        *_common(), oh.make_node("ReduceSum", ["partials", "axis_2"], ["state"], keepdims=0),
    ], opset, list(ops.PLUGIN_ATTRIBUTES))
    apply = _function(ops.APPLY, ["q", "state"], ["out"], [
        *_common(), *_heads(), _eps(), *_split_heads("q"), *_phi("q"),
        oh.make_node("Shape", ["state"], ["state_shape"]),
        oh.make_node("Constant", [], ["axis_last"], value_ints=[-1]),
        oh.make_node("Constant", [], ["zero"], value_ints=[0]),
        oh.make_node("Constant", [], ["big"], value_ints=[1 << 30]),
        oh.make_node("Gather", ["state_shape", "axis_2"], ["d_1d"], axis=0),
        oh.make_node("Slice", ["state", "zero", "d_1d", "axis_last"], ["kv"]),
        oh.make_node("Slice", ["state", "d_1d", "big", "axis_last"], ["mean"]),
        oh.make_node("MatMul", ["q_phi", "kv"], ["numerator"]),
        oh.make_node("MatMul", ["q_phi", "mean"], ["z_raw"]),
        oh.make_node("Add", ["z_raw", "eps_value"], ["z"]),
        oh.make_node("Div", ["numerator", "z"], ["out_heads"]),
        *_merge_heads("out_heads", "q"),
    ], opset, ["heads", "eps", *ops.PLUGIN_ATTRIBUTES])
    return [state, reduce, apply]
