"""The LinearAttention node's function body, run by ONNX Runtime, against the float64 reference."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from linfusion.export.attention_op import function_proto
from reference import attention_core


def single_node_model(heads, eps, elem_type):
    node = helper.make_node("LinearAttention", ["q", "k", "v"], ["out"], domain="linfusion",
                            heads=heads, eps=eps, plugin_namespace="linfusion", plugin_version="1")
    io = [helper.make_tensor_value_info(n, elem_type, ["batch", "tokens", "channels"]) for n in "qkv"]
    graph = helper.make_graph([node], "g", io,
                              [helper.make_tensor_value_info("out", elem_type, ["batch", "tokens", "channels"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("linfusion", 1)],
                              functions=[function_proto()])
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch,tokens,heads,dim", [(1, 1, 1, 8), (2, 77, 2, 64), (1, 4096, 5, 40), (3, 333, 4, 32)])
def test_one_session_serves_every_token_count(batch, tokens, heads, dim):
    session = single_node_model(heads, 1e-4, TensorProto.FLOAT)
    rng = np.random.default_rng(tokens)
    for n in (tokens, 2 * tokens + 3):  # N differs from any "trace" size: read at run time
        q, k, v = (rng.standard_normal((batch, n, dim)).astype(np.float32) for _ in range(3))
        got = session.run(None, {"q": q, "k": k, "v": v})[0]
        expected = attention_core(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), heads)
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


def test_eps_attribute_is_used():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 16, 8)).astype(np.float32) - 2 for _ in range(3))
    a = single_node_model(2, 1e-4, TensorProto.FLOAT).run(None, {"q": q, "k": k, "v": v})[0]
    b = single_node_model(2, 0.3, TensorProto.FLOAT).run(None, {"q": q, "k": k, "v": v})[0]
    np.testing.assert_allclose(b, attention_core(q.astype(float), k.astype(float), v.astype(float), 2, 0.3), rtol=1e-5)
    assert not np.allclose(a, b)


def test_fp16_beyond_65504_tokens_stays_finite_and_accurate():
    """An fp16 N overflows to inf at 65536 tokens; the body keeps N and the sums in float32."""
    session = single_node_model(2, 1e-4, TensorProto.FLOAT16)
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 70_000, 16)).astype(np.float16) for _ in range(3))
    got = session.run(None, {"q": q, "k": k, "v": v})[0]
    expected = attention_core(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), 2)
    assert got.dtype == np.float16 and np.isfinite(got).all()
    assert np.abs(got - expected).max() / np.abs(expected).max() < 2e-3
