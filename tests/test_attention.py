import numpy as np
import pytest
import torch

from linfusion.attention import GeneralizedLinearAttention, linear_attention
from reference import attention_core, linear_attention_layer


def random_layer(dim, heads, mid=None, seed=0):
    torch.manual_seed(seed)
    layer = GeneralizedLinearAttention(dim, heads, mid)
    with torch.no_grad():  # non-trivial LayerNorm affine params, not the 1/0 defaults
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer.eval()


@pytest.mark.parametrize("batch,tokens,dim,heads,mid", [
    (1, 1, 8, 1, None), (2, 16, 32, 4, None), (1, 257, 40, 1, None),
    (3, 64, 64, 8, 4), (2, 1024, 80, 2, 5), (1, 4096, 16, 2, None),
])
def test_layer_matches_float64_reference(batch, tokens, dim, heads, mid):
    layer = random_layer(dim, heads, mid).double()
    x = torch.randn(batch, tokens, dim, dtype=torch.float64)
    state = {k: v.numpy() for k, v in layer.state_dict().items()}
    expected = linear_attention_layer(x.numpy(), state, heads)
    with torch.no_grad():
        got = layer(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_token_count_is_read_at_run_time():
    """One module at several N: a scale frozen at the first N would break the later ones."""
    layer = random_layer(32, 4).double()
    state = {k: v.numpy() for k, v in layer.state_dict().items()}
    for tokens in (64, 16, 1024, 9):
        x = torch.randn(2, tokens, 32, dtype=torch.float64)
        with torch.no_grad():
            got = layer(x).numpy()
        np.testing.assert_allclose(got, linear_attention_layer(x.numpy(), state, 4), rtol=1e-10, atol=1e-12)


def test_eps_enters_the_normaliser():
    q, k, v = (torch.randn(1, 32, 8, dtype=torch.float64) for _ in range(3))
    for eps in (1e-4, 0.5):
        got = linear_attention(q, k, v, heads=2, eps=eps).numpy()
        np.testing.assert_allclose(got, attention_core(q.numpy(), k.numpy(), v.numpy(), 2, eps), rtol=1e-11)
    assert not np.allclose(linear_attention(q, k, v, 2, 1e-4), linear_attention(q, k, v, 2, 0.5))


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tokens", [256, 70_000])
def test_half_precision_core_tracks_fp32(dtype, rtol, tokens):
    """fp16/bf16 inputs: reductions in fp32, so even N > 65504 (fp16's max) stays accurate."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, tokens, 16) for _ in range(3))
    q16, k16, v16 = (t.to(dtype) for t in (q, k, v))
    expected = attention_core(*(t.double().numpy() for t in (q16, k16, v16)), heads=2)
    got = linear_attention(q16, k16, v16, heads=2)
    assert got.dtype == dtype
    got = got.double().numpy()
    assert np.isfinite(got).all()
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel < rtol


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_layer_tracks_fp32(dtype, rtol):
    layer = random_layer(64, 4)
    x = torch.randn(2, 512, 64)
    with torch.no_grad():
        expected = layer(x)
        got = layer.to(dtype)(x.to(dtype)).float()
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel < rtol


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="heads"):
        GeneralizedLinearAttention(30, 4)
    q = torch.randn(1, 8, 12)
    with pytest.raises(ValueError, match="share one shape"):
        linear_attention(q, torch.randn(1, 9, 12), q, heads=2)
