import numpy as np
import pytest

from linfusion.runtime import vae
from linfusion.runtime.vae import Tiling, ramp, run_tiled


def local_decoder(x):
    """A stand-in VAE decoder that is purely local (nearest-neighbour x8 upsampling + a pointwise map)."""
    up = np.kron(x[:, :3], np.ones((1, 1, 8, 8), dtype=np.float32))
    return np.tanh(up)


@pytest.mark.parametrize("h,w", [(16, 16), (40, 24), (64, 100), (17, 9)])
def test_tiling_is_exact_for_local_operators(h, w):
    """Blending identical overlapping values must give them back exactly: weights sum to one."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, h, w)).astype(np.float32)
    full = local_decoder(latents)
    tiled = run_tiled(local_decoder, latents, Tiling(16, 4), 1, 8, 3)
    np.testing.assert_allclose(tiled, full, rtol=0, atol=1e-6)


def test_tiles_cover_and_overlap():
    tiling = Tiling(64, 16)
    for length in (64, 65, 100, 128, 300):
        starts = tiling.starts(length)
        assert starts[0] == 0 and starts[-1] + 64 == length
        assert all(b - a <= 48 for a, b in zip(starts, starts[1:]))
    assert tiling.starts(30) == [0]


def test_ramp_shape():
    r = ramp(10, 4, 0)
    assert r[0] == pytest.approx(0.125) and r[-1] == 1.0 and (np.diff(r) >= 0).all()


def test_sample_latents_matches_diagonal_gaussian():
    import torch
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    rng = np.random.default_rng(1)
    params = rng.standard_normal((1, 8, 5, 6)).astype(np.float32) * 3
    noise = rng.standard_normal((1, 4, 5, 6)).astype(np.float32)
    dist = DiagonalGaussianDistribution(torch.from_numpy(params))
    expected = (dist.mean + dist.std * torch.from_numpy(noise)).numpy()
    np.testing.assert_allclose(vae.sample_latents(params, noise), expected, rtol=1e-6, atol=1e-6)
