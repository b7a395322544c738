"""VAE decode and encode, whole or in overlapping tiles blended together.

Tiling bounds memory for large images: each tile is decoded on its own and tiles overlap by a
quarter, cross-faded with linear ramps. The VAE's mid-block attention sees one tile instead
of the whole image, so a tiled result differs slightly from a full decode; the measured
difference is in docs/performance.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backends.base import ModelRunner
from .contract import VaeDecoderIO, VaeEncoderIO


@dataclass(frozen=True)
class Tiling:
    tile: int
    """Tile edge in latent pixels."""
    overlap: int
    """Overlap between neighbouring tiles in latent pixels."""

    def starts(self, length: int) -> list[int]:
        if length <= self.tile:
            return [0]
        stride = self.tile - self.overlap
        starts = list(range(0, length - self.tile, stride))
        return starts + [length - self.tile]


def ramp(length: int, fade_in: int, fade_out: int) -> np.ndarray:
    """Weights rising over ``fade_in`` and falling over ``fade_out`` samples, 1 in between."""
    positions = np.arange(length, dtype=np.float32) + 0.5
    weights = np.ones(length, dtype=np.float32)
    if fade_in:
        weights = np.minimum(weights, positions / fade_in)
    if fade_out:
        weights = np.minimum(weights, (length - positions) / fade_out)
    return weights


def run_tiled(run, source: np.ndarray, tiling: Tiling, in_scale: int, out_scale: int,
              out_channels: int) -> np.ndarray:
    """Apply ``run`` tile by tile; sizes in latent pixels times ``in_scale`` / ``out_scale``."""
    batch, _, height, width = source.shape
    lat_h, lat_w = height // in_scale, width // in_scale
    out = np.zeros((batch, out_channels, lat_h * out_scale, lat_w * out_scale), dtype=np.float32)
    total = np.zeros((lat_h * out_scale, lat_w * out_scale), dtype=np.float32)
    ys, xs = tiling.starts(lat_h), tiling.starts(lat_w)
    fade = tiling.overlap * out_scale
    for yi, y in enumerate(ys):
        th = min(tiling.tile, lat_h)
        wy = ramp(th * out_scale, fade if yi else 0, fade if yi < len(ys) - 1 else 0)
        for xi, x in enumerate(xs):
            tw = min(tiling.tile, lat_w)
            wx = ramp(tw * out_scale, fade if xi else 0, fade if xi < len(xs) - 1 else 0)
            window = source[:, :, y * in_scale:(y + th) * in_scale, x * in_scale:(x + tw) * in_scale]
            weight = wy[:, None] * wx[None, :]
            ys_out = slice(y * out_scale, (y + th) * out_scale)
            xs_out = slice(x * out_scale, (x + tw) * out_scale)
            out[:, :, ys_out, xs_out] += run(window).astype(np.float32) * weight
            total[ys_out, xs_out] += weight
    return out / total


def decode(runner: ModelRunner, latents: np.ndarray, factor: int, tiling: Tiling | None) -> np.ndarray:
    """Unscaled latents -> images in [-1, 1]."""
    def run(x: np.ndarray) -> np.ndarray:
        return runner.run({VaeDecoderIO.latent_sample: x})[VaeDecoderIO.sample]

    if tiling is None:
        return run(latents).astype(np.float32)
    return run_tiled(run, latents, tiling, 1, factor, 3)


def encode(runner: ModelRunner, images: np.ndarray, factor: int, tiling: Tiling | None) -> np.ndarray:
    """Images in [-1, 1] -> latent parameters (mean and log-variance, concatenated on channels)."""
    def run(x: np.ndarray) -> np.ndarray:
        return runner.run({VaeEncoderIO.sample: x})[VaeEncoderIO.latent_parameters]

    if tiling is None:
        return run(images).astype(np.float32)
    channels = runner.spec.outputs[0].shape[1]
    return run_tiled(run, images, tiling, factor, 1, channels)


def sample_latents(parameters: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """DiagonalGaussianDistribution.sample: mean + exp(0.5 * clamp(logvar, -30, 20)) * noise."""
    mean, logvar = np.split(parameters.astype(np.float32), 2, axis=1)
    return mean + np.exp(0.5 * np.clip(logvar, -30.0, 20.0)) * noise
