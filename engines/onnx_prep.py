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
from linfusion.runtime.contract import ops
from linfusion.runtime.contract.attention_onnx import plugin_reference_functions
from onnx import helper as oh

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
    return [n for n in model.graph.node if n.domain == ops.DOMAIN and n.op_type == ops.LINEAR_ATTENTION]


def _plugin_attrs() -> dict:
    return dict(zip(ops.PLUGIN_ATTRIBUTES, (ops.PLUGIN_NAMESPACE, ops.PLUGIN_VERSION, 1)))


def rewrite_to_plugins(model: onnx.ModelProto) -> int:
    """Replace each LinearAttention node in place by the State/Reduce/Apply triple; returns the count."""
    nodes = list(model.graph.node)
    out: list[onnx.NodeProto] = []
    count = 0
    for node in nodes:
        if node.domain != ops.DOMAIN or node.op_type != ops.LINEAR_ATTENTION:
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
        out.append(oh.make_node(ops.STATE, [k, v], [partials], name=f"{base}/state", domain=ops.DOMAIN,
                                heads=int(heads), **_plugin_attrs()))
        out.append(oh.make_node(ops.REDUCE, [partials], [state], name=f"{base}/reduce", domain=ops.DOMAIN,
                                **_plugin_attrs()))
        out.append(oh.make_node(ops.APPLY, [q, state], [node.output[0]], name=f"{base}/apply", domain=ops.DOMAIN,
                                heads=int(heads), eps=float(eps), **_plugin_attrs()))
    del model.graph.node[:]
    model.graph.node.extend(out)
    if count and not any(o.domain == ops.DOMAIN for o in model.opset_import):
        model.opset_import.append(oh.make_opsetid(ops.DOMAIN, ops.DOMAIN_VERSION))
    return count


def strip_plugin_attributes(model: onnx.ModelProto) -> int:
    """Plugin off: drop plugin_namespace/plugin_version so every parser inlines the function."""
    count = 0
    for node in attention_nodes(model):
        keep = [a for a in node.attribute if a.name not in ops.PLUGIN_ATTRIBUTES]
        del node.attribute[:]
        node.attribute.extend(keep)
        count += 1
    return count


def reference_functions(opset: int = 18) -> list[onnx.FunctionProto]:
    """Standard-op bodies of the three plugin ops (the contract's builder, S = 1), so ONNX Runtime
    can run a rewritten graph. Used by the tests to prove the rewrite; never put into a file that
    TensorRT parses (an older parser would inline them instead of using the plugins)."""
    return plugin_reference_functions(opset)


def with_reference_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Attach reference_functions (replacing any of the same names) to a rewritten model."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    keep = [f for f in model.functions if not (f.domain == ops.DOMAIN and f.name in ops.PLUGIN_OPS)]
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
