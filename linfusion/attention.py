"""LinFusion's generalized linear attention: the one module that replaces each UNet ``attn1``.

The math follows the official implementation (Huage001/LinFusion) line for line, so that
official checkpoints reproduce their outputs:

    q = W_q(x + P_q(x)),  k = W_k(x + P_k(x)),  v = W_v x
    per head, with phi = elu + 1:
    kv  = (phi(k)^T * N^-1/2) @ (v * N^-1/2)
    z   = phi(q) @ mean_N(phi(k))^T + eps
    out = W_o(phi(q) @ kv / z)

N is read from the input's shape on every call; nothing is frozen at construction time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_EPS = 1e-4


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1: positive, so the normaliser z never changes sign."""
    return F.elu(x) + 1.0


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Multi-head linear attention on projected tensors shaped [B, N, H*d].

    Half-precision inputs are computed in float32: the sums over N (up to 2^20 tokens at
    16K) and the N^-1/2 scale overflow or lose all precision in fp16, so the output is
    cast back only at the end.
    """
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k and v must share one shape [B, N, H*d]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    batch, tokens, channels = q.shape
    if channels % heads:
        raise ValueError(f"{channels} channels do not split into {heads} heads")
    out_dtype = q.dtype
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype

    def split_heads(x: torch.Tensor) -> torch.Tensor:
        return x.to(compute_dtype).reshape(batch, tokens, heads, channels // heads).transpose(1, 2)

    phi_q = feature_map(split_heads(q))
    phi_k = feature_map(split_heads(k))
    v = split_heads(v)
    scale = tokens**-0.5
    z = phi_q @ phi_k.mean(dim=-2, keepdim=True).transpose(-2, -1) + eps
    kv = (phi_k.transpose(-2, -1) * scale) @ (v * scale)
    out = phi_q @ kv / z
    return out.transpose(1, 2).reshape(batch, tokens, channels).to(out_dtype)


def nonlinear_projection(dim: int, mid_dim: int | None = None) -> nn.Sequential:
    """P = Linear -> LayerNorm -> LeakyReLU -> Linear; indices 0, 1, 3 carry the checkpoint keys."""
    mid = mid_dim or dim
    return nn.Sequential(
        nn.Linear(dim, mid),
        nn.LayerNorm(mid),
        nn.LeakyReLU(negative_slope=0.01),
        nn.Linear(mid, dim),
    )


class GeneralizedLinearAttention(nn.Module):
    """Drop-in replacement for a diffusers self-attention (``attn1``) module.

    Parameter names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``to_q_.{0,1,3}``,
    ``to_k_.{0,1,3}``) match the official checkpoints, so their state dicts load unchanged.
    """

    def __init__(self, dim: int, heads: int, projection_mid_dim: int | None = None,
                 eps: float = DEFAULT_EPS) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.dim = dim
        self.heads = heads
        self.projection_mid_dim = projection_mid_dim
        self.eps = eps
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.to_q_ = nonlinear_projection(dim, projection_mid_dim)
        self.to_k_ = nonlinear_projection(dim, projection_mid_dim)

    def project(self, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q, k, v projections; split out so exporters and validators can hook the core."""
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = self.to_q(hidden_states + self.to_q_(hidden_states))
        k = self.to_k(context + self.to_k_(context))
        v = self.to_v(context)
        return q, k, v

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention itself; the ONNX exporter routes this call to a single graph node."""
        return linear_attention(q, k, v, self.heads, self.eps)

    def forward(self, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        # attention_mask and cross_attention_kwargs are accepted for diffusers' call signature;
        # linear self-attention has no mask, exactly as in the official module.
        q, k, v = self.project(hidden_states, encoder_hidden_states)
        out = self.core(q, k, v)
        return self.to_out[1](self.to_out[0](out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, projection_mid_dim={self.projection_mid_dim}"
