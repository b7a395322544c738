"""Independent float64 numpy references, written from the paper's equations, not from the code."""

import numpy as np


def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def projection(x, p):
    """P(x) = Linear -> LayerNorm -> LeakyReLU(0.01) -> Linear, from a state dict prefix."""
    h = x @ p["0.weight"].T + p["0.bias"]
    h = layer_norm(h, p["1.weight"], p["1.bias"])
    h = np.where(h > 0, h, 0.01 * h)
    return h @ p["3.weight"].T + p["3.bias"]


def phi(x):
    return np.where(x > 0, x + 1.0, np.exp(x))


def attention_core(q, k, v, heads, eps=1e-4):
    """Per batch and head: out_n = sum_m phi(q_n).phi(k_m) v_m / N / (phi(q_n).mean_m phi(k_m) + eps)."""
    b, n, c = q.shape
    d = c // heads
    out = np.empty((b, n, c))
    for bi in range(b):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            fq, fk, vv = phi(q[bi, :, sl]), phi(k[bi, :, sl]), v[bi, :, sl]
            kv = np.einsum("md,me->de", fk, vv) / n
            z = fq @ fk.mean(0) + eps
            out[bi, :, sl] = (fq @ kv) / z[:, None]
    return out


def linear_attention_layer(x, state, heads, eps=1e-4):
    """The whole LinFusion layer from a state dict (numpy float64 arrays)."""
    sub = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    q = (x + projection(x, sub("to_q_."))) @ state["to_q.weight"].T
    k = (x + projection(x, sub("to_k_."))) @ state["to_k.weight"].T
    v = x @ state["to_v.weight"].T
    return attention_core(q, k, v, heads, eps) @ state["to_out.0.weight"].T + state["to_out.0.bias"]
