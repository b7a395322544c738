"""The linear-attention op as the export contract names it, and the TensorRT plugins it maps to.

The exporter writes one ``linfusion::LinearAttention(q, k, v)`` node per LinFusion layer with the
attributes below; the engine builder rewrites each into the State -> Reduce -> Apply plugin
triple; the runtime checks node counts. Every one of them reads these names from here.
"""

from __future__ import annotations

DOMAIN = "linfusion"
"""ONNX domain of the attention op and of the plugin ops."""
DOMAIN_VERSION = 1

LINEAR_ATTENTION = "LinearAttention"
"""The exported op: q, k, v [B, N, heads*d] -> out [B, N, heads*d]."""
ATTRIBUTES = ("heads", "eps", "plugin_namespace", "plugin_version")
"""Attributes of the exported node, in the order its local function declares them."""

PLUGIN_NAMESPACE = "linfusion"
PLUGIN_VERSION = "1"
PLUGIN_ATTRIBUTES = ("plugin_namespace", "plugin_version", "aot")
"""Attributes that route a node to a TensorRT plugin (removed to force the function to be inlined)."""

STATE = "LinearAttentionState"
"""(k, v) -> float32 partials [B, H, S, D, D+1]: per token split, sum of [phi(k)^T v | phi(k)] / N."""
REDUCE = "LinearAttentionReduce"
"""partials -> float32 state [B, H, D, D+1] (sum over the splits)."""
APPLY = "LinearAttentionApply"
"""(q, state) -> out [B, N, H*D] in q's dtype: phi(q) kv / (phi(q) . mean + eps)."""
PLUGIN_OPS = (STATE, REDUCE, APPLY)
