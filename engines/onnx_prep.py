"""Preparing an exported ONNX file for the TensorRT parser (the export file is never changed).

The export has one ``linfusion::LinearAttention(q, k, v)`` node per layer (attributes heads,
eps, plugin_namespace, plugin_version) plus a local function with its standard-op body.
An AOT plugin may launch one kernel and has no workspace, so with the plugin on each node
becomes three ``linfusion``-domain nodes, each a TensorRT plugin:

    partials = LinearAttentionState(k, v)       float32 [B, H, S, D, D+1]; S >= 1 token splits,
                                                each slot = sum over its tokens of
                                                [phi(k)^T v | phi(k)] / N
    state    = LinearAttentionReduce(partials)  float32 [B, H, D, D+1] = sum over S (kv | mean)
    out      = LinearAttentionApply(q, state)   [B, N, H*D] in q's dtype:
                                                phi(q) kv / (phi(q) . mean + eps)

S is chosen by the plugin from the shapes (``kernels.num_splits``); the reference functions
below use S = 1, which satisfies the same contract. With the plugin off, the
``plugin_namespace``/``plugin_version`` attributes are removed so that every parser inlines the
local function.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto
from onnx import helper as oh

DOMAIN = "linfusion"
SOURCE_OP = "LinearAttention"
STATE_OP = "LinearAttentionState"
REDUCE_OP = "LinearAttentionReduce"
APPLY_OP = "LinearAttentionApply"
PLUGIN_OPS = (STATE_OP, REDUCE_OP, APPLY_OP)
PLUGIN_NAMESPACE = "linfusion"
PLUGIN_VERSION = "1"
PLUGIN_ATTRIBUTES = ("plugin_namespace", "plugin_version", "aot")
EXTERNAL_DATA_THRESHOLD = 1 << 30


class PrepareError(ValueError):
    """The ONNX file does not have the shape the engine builder expects."""


@dataclass
class Prepared:
    path: Path
    attention_nodes: int
    plugin: bool
    heads: list[int] = field(default_factory=list)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return oh.get_attribute_value(a)
    return default


def attention_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == SOURCE_OP]


def _plugin_attrs() -> dict:
    return {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION, "aot": 1}


def rewrite_to_plugins(model: onnx.ModelProto) -> int:
    """Replace each LinearAttention node in place by the State/Reduce/Apply triple; returns the count."""
    nodes = list(model.graph.node)
    out: list[onnx.NodeProto] = []
    count = 0
    for node in nodes:
        if node.domain != DOMAIN or node.op_type != SOURCE_OP:
            out.append(node)
            continue
        if len(node.input) != 3 or len(node.output) != 1:
            raise PrepareError(f"node {node.name!r}: LinearAttention takes (q, k, v) and has one output")
        heads = _attr(node, "heads")
        eps = _attr(node, "eps")
        if heads is None or eps is None:
            raise PrepareError(f"node {node.name!r} lacks the 'heads' or 'eps' attribute")
        count += 1
        base = node.name or f"linear_attention_{count}"
        q, k, v = node.input
        partials, state = f"{base}/kv_partials", f"{base}/kv_state"
        out.append(oh.make_node(STATE_OP, [k, v], [partials], name=f"{base}/state", domain=DOMAIN,
                                heads=int(heads), **_plugin_attrs()))
        out.append(oh.make_node(REDUCE_OP, [partials], [state], name=f"{base}/reduce", domain=DOMAIN,
                                **_plugin_attrs()))
        out.append(oh.make_node(APPLY_OP, [q, state], [node.output[0]], name=f"{base}/apply", domain=DOMAIN,
                                heads=int(heads), eps=float(eps), **_plugin_attrs()))
    del model.graph.node[:]
    model.graph.node.extend(out)
    if count and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(oh.make_opsetid(DOMAIN, 1))
    return count


def strip_plugin_attributes(model: onnx.ModelProto) -> int:
    """Plugin off: drop plugin_namespace/plugin_version so every parser inlines the function."""
    count = 0
    for node in attention_nodes(model):
        keep = [a for a in node.attribute if a.name not in PLUGIN_ATTRIBUTES]
        del node.attribute[:]
        node.attribute.extend(keep)
        count += 1
    return count


def reference_functions(opset: int = 18) -> list[onnx.FunctionProto]:
    """Standard-op bodies of the three plugin ops (S = 1), so ONNX Runtime can run a rewritten
    graph. Used by the tests to prove the rewrite; never put into a file that TensorRT parses
    (an older parser would inline them instead of using the plugins)."""
    common = [oh.make_node("Constant", [], ["one"], value_float=1.0),
              oh.make_node("Constant", [], ["axis_0"], value_ints=[0]),
              oh.make_node("Constant", [], ["axis_1"], value_ints=[1]),
              oh.make_node("Constant", [], ["axis_2"], value_ints=[2]),
              oh.make_node("Constant", [], ["minus_1"], value_ints=[-1])]

    def heads_from_attr() -> list[onnx.NodeProto]:
        proto = oh.make_node("Constant", [], ["heads_scalar"])
        proto.attribute.append(onnx.AttributeProto(name="value_int", type=onnx.AttributeProto.INT, ref_attr_name="heads"))
        return [proto, oh.make_node("Reshape", ["heads_scalar", "axis_1"], ["heads_1d"])]

    def split_heads(x: str) -> list[onnx.NodeProto]:  # [B, N, H*d] -> float32 [B, H, N, d]
        return [oh.make_node("Shape", [x], [f"{x}_shape"]),
                oh.make_node("Slice", [f"{x}_shape", "axis_0", "axis_2"], [f"{x}_bn"]),
                oh.make_node("Concat", [f"{x}_bn", "heads_1d", "minus_1"], [f"{x}_split_shape"], axis=0),
                oh.make_node("Cast", [x], [f"{x}_f32"], to=TensorProto.FLOAT),
                oh.make_node("Reshape", [f"{x}_f32", f"{x}_split_shape"], [f"{x}_split"]),
                oh.make_node("Transpose", [f"{x}_split"], [f"{x}_heads"], perm=[0, 2, 1, 3])]

    def phi(x: str) -> list[onnx.NodeProto]:
        return [oh.make_node("Elu", [f"{x}_heads"], [f"{x}_elu"], alpha=1.0),
                oh.make_node("Add", [f"{x}_elu", "one"], [f"{x}_phi"])]

    attrs = ["heads", *PLUGIN_ATTRIBUTES]
    state = oh.make_function(DOMAIN, STATE_OP, ["k", "v"], ["partials"], [
        *common, *heads_from_attr(), *split_heads("k"), *split_heads("v"), *phi("k"),
        oh.make_node("Shape", ["k_phi"], ["phi_shape"]),
        oh.make_node("Gather", ["phi_shape", "axis_2"], ["tokens_1d"], axis=0),
        oh.make_node("Cast", ["tokens_1d"], ["tokens_f32"], to=TensorProto.FLOAT),
        oh.make_node("Transpose", ["k_phi"], ["k_phi_t"], perm=[0, 1, 3, 2]),
        oh.make_node("MatMul", ["k_phi_t", "v_heads"], ["kv_sum"]),
        oh.make_node("ReduceSum", ["k_phi", "axis_2"], ["k_sum"], keepdims=1),
        oh.make_node("Transpose", ["k_sum"], ["k_sum_t"], perm=[0, 1, 3, 2]),
        oh.make_node("Concat", ["kv_sum", "k_sum_t"], ["both"], axis=-1),
        oh.make_node("Div", ["both", "tokens_f32"], ["scaled"]),
        oh.make_node("Unsqueeze", ["scaled", "axis_2"], ["partials"]),
    ], opset_imports=[oh.make_opsetid("", opset)], attributes=attrs)
    reduce = oh.make_function(DOMAIN, REDUCE_OP, ["partials"], ["state"], [
        *common, oh.make_node("ReduceSum", ["partials", "axis_2"], ["state"], keepdims=0),
    ], opset_imports=[oh.make_opsetid("", opset)], attributes=list(PLUGIN_ATTRIBUTES))
    eps = oh.make_node("Constant", [], ["eps_value"])
    eps.attribute.append(onnx.AttributeProto(name="value_float", type=onnx.AttributeProto.FLOAT, ref_attr_name="eps"))
    apply = oh.make_function(DOMAIN, APPLY_OP, ["q", "state"], ["out"], [
        *common, *heads_from_attr(), eps, *split_heads("q"), *phi("q"),
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
        oh.make_node("Transpose", ["out_heads"], ["out_split"], perm=[0, 2, 1, 3]),
        oh.make_node("Concat", ["q_bn", "minus_1"], ["merge_shape"], axis=0),
        oh.make_node("Reshape", ["out_split", "merge_shape"], ["out_f32"]),
        oh.make_node("CastLike", ["out_f32", "q"], ["out"]),
    ], opset_imports=[oh.make_opsetid("", opset)], attributes=["heads", "eps", *PLUGIN_ATTRIBUTES])
    return [state, reduce, apply]


def with_reference_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Attach reference_functions (replacing any of the same names) to a rewritten model."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name in PLUGIN_OPS)]
    del model.functions[:]
    model.functions.extend(keep + reference_functions(opset))
    return model


def prepare(source: str | Path, destination: str | Path, plugin: bool) -> Prepared:
    """Write the copy of ``source`` that the parser reads to ``destination`` (a .onnx path)."""
    source, destination = Path(source), Path(destination)
    model = onnx.load(str(source), load_external_data=True)
    heads = [int(_attr(n, "heads")) for n in attention_nodes(model)]
    count = rewrite_to_plugins(model) if plugin else strip_plugin_attributes(model)
    destination.parent.mkdir(parents=True, exist_ok=True)
    external = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    if external:
        data = destination.name + ".data"
        if (destination.parent / data).exists():
            os.remove(destination.parent / data)
        onnx.save_model(model, str(destination), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
    else:
        onnx.save_model(model, str(destination))
    return Prepared(destination, count, plugin, heads)
