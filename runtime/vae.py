"""VAE decode and encode, whole or in overlapping tiles run in batches and blended together.

Tiling bounds memory for large images (a 16384x8192 image is 2048x1024 latent pixels). Tiles
are laid out evenly per axis: the fewest tiles of at most ``Tiling.tile`` latent pixels that
overlap their neighbours by at least ``Tiling.overlap`` latent pixels, all of one size, so that
they stack along the VAE's dynamic batch axis and run ``Tiling.batch`` at a time. The overlap is
a fixed number of latent pixels (not a fraction of the tile), so large tiles waste little; it is
cross-faded with linear ramps whose weights are normalised to sum to one.

The VAE's mid-block attention and group norms see one tile instead of the whole image, so a
tiled result differs slightly from a full decode; the measured difference is in
benchmarks/results/vae_tiling.json and docs/performance.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .backends.base import ModelRunner, ShapeError
from .contract import VaeDecoderIO, VaeEncoderIO

DEFAULT_OVERLAP = 8
"""Latent pixels shared by neighbouring tiles (64 image pixels at the usual factor of 8)."""
DEFAULT_BUDGET = 4 * 2**30
"""Bytes one VAE call may use when the tile size is chosen from a budget."""
MAX_BATCH = 8
BYTES_PER_CHANNEL_PIXEL = 17
"""Peak activation elements of one VAE call per image pixel and per channel of the VAE's widest
full-resolution block, measured on ONNX Runtime CPU (SD-1.5's VAE: ~8.7 KB per pixel in fp32 with
128 channels, i.e. 17 elements x 128 channels x 4 bytes); the mid-block attention adds 3 N^2."""


@dataclass(frozen=True)
class Tiling:
    tile: int
    """Largest tile edge in latent pixels."""
    overlap: int
    """Least overlap between neighbouring tiles in latent pixels."""
    batch: int = 1
    """Tiles per VAE call (the VAE's batch axis is dynamic)."""

    def __post_init__(self) -> None:
        if self.tile < 1 or not 0 <= self.overlap < self.tile or self.batch < 1:
            raise ValueError(f"tiling needs tile >= 1, 0 <= overlap < tile and batch >= 1; got tile "
                             f"{self.tile}, overlap {self.overlap}, batch {self.batch}")

    def starts(self, length: int) -> list[int]:
        """Starts of full-size tiles stepping by ``tile - overlap``, the last flush with the end
        (the layout of earlier releases; ``spans`` is the one ``run_tiled`` uses)."""
        if length <= self.tile:
            return [0]
        stride = self.tile - self.overlap
        starts = list(range(0, length - self.tile, stride))
        return starts + [length - self.tile]

    def spans(self, length: int) -> tuple[list[int], int]:
        """(starts, size): the fewest equal tiles of at most ``tile`` covering ``length`` with
        neighbours overlapping by at least ``overlap``, spread evenly."""
        if length <= self.tile:
            return [0], length
        count = math.ceil((length - self.overlap) / (self.tile - self.overlap))
        size = math.ceil((length + (count - 1) * self.overlap) / count)
        return [round(i * (length - size) / (count - 1)) for i in range(count)], size

    @classmethod
    def from_pixels(cls, pixels: int, factor: int, overlap: int = DEFAULT_OVERLAP, batch: int = 1) -> Tiling:
        """Tiles of ``pixels`` image pixels (a multiple of the VAE factor), e.g. ``tile_vae=1024``."""
        if isinstance(pixels, bool) or pixels % factor or pixels // factor <= overlap:
            raise ValueError(f"a VAE tile must be a multiple of {factor} pixels larger than the "
                             f"{overlap * factor}-pixel overlap; got {pixels}")
        return cls(pixels // factor, overlap, batch)

    @classmethod
    def for_budget(cls, budget: int, factor: int, channels: int = 128, itemsize: int = 4,
                   max_tile: int = 128, overlap: int = DEFAULT_OVERLAP) -> Tiling:
        """The largest square tile (a multiple of 8 latent pixels, at most ``max_tile``) whose call
        fits in ``budget`` bytes by ``tile_bytes``, and as many of them per call as still fit."""
        sides = list(range(8 * (max_tile // 8), overlap, -8)) or [max_tile]
        tile = next((side for side in sides if tile_bytes(side, side, factor, channels, itemsize) <= budget),
                    sides[-1])
        batch = budget // max(tile_bytes(tile, tile, factor, channels, itemsize), 1)
        return cls(tile, overlap, int(min(max(batch, 1), MAX_BATCH)))


def tile_bytes(latent_h: int, latent_w: int, factor: int, channels: int = 128, itemsize: int = 4) -> int:
    """Estimated peak bytes of one VAE call on one latent_h x latent_w tile."""
    pixels = latent_h * latent_w * factor * factor
    tokens = latent_h * latent_w
    return itemsize * (BYTES_PER_CHANNEL_PIXEL * channels * pixels + 3 * tokens * tokens)


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
    """Apply ``run`` to equal tiles, ``tiling.batch`` tiles per call, and blend the results.

    Sizes are latent pixels times ``in_scale`` (input) and ``out_scale`` (output)."""
    batch, _, height, width = source.shape
    lat_h, lat_w = height // in_scale, width // in_scale
    (ys, th), (xs, tw) = tiling.spans(lat_h), tiling.spans(lat_w)
    fade = tiling.overlap * out_scale
    wy = [ramp(th * out_scale, fade if i else 0, fade if i < len(ys) - 1 else 0) for i in range(len(ys))]
    wx = [ramp(tw * out_scale, fade if i else 0, fade if i < len(xs) - 1 else 0) for i in range(len(xs))]
    out = np.zeros((batch, out_channels, lat_h * out_scale, lat_w * out_scale), dtype=np.float32)
    total = np.zeros((lat_h * out_scale, lat_w * out_scale), dtype=np.float32)
    tiles = [(yi, xi) for yi in range(len(ys)) for xi in range(len(xs))]
    for first in range(0, len(tiles), tiling.batch):
        group = tiles[first:first + tiling.batch]
        windows = [source[:, :, ys[yi] * in_scale:(ys[yi] + th) * in_scale,
                          xs[xi] * in_scale:(xs[xi] + tw) * in_scale] for yi, xi in group]
        results = run(windows[0] if len(windows) == 1 else np.concatenate(windows)).astype(np.float32)
        for k, (yi, xi) in enumerate(group):
            weight = wy[yi][:, None] * wx[xi][None, :]
            ys_out = slice(ys[yi] * out_scale, (ys[yi] + th) * out_scale)
            xs_out = slice(xs[xi] * out_scale, (xs[xi] + tw) * out_scale)
            out[:, :, ys_out, xs_out] += results[k * batch:(k + 1) * batch] * weight
            total[ys_out, xs_out] += weight
        del results, windows
    out /= total
    return out


def _fitting_batch(runner: ModelRunner, tiling: Tiling, shape: tuple[int, ...]) -> Tiling:
    """``tiling`` with its batch lowered until the runner takes it (a TensorRT profile's batch range)."""
    batch = tiling.batch
    while batch > 1:
        try:
            runner.check_shapes({runner.input_names[0]: (shape[0] * batch, *shape[1:])})
            break
        except ShapeError:
            batch -= 1
    return Tiling(tiling.tile, tiling.overlap, batch)


def _tile_shape(tiling: Tiling, source: np.ndarray, in_scale: int) -> tuple[int, ...]:
    lat_h, lat_w = source.shape[2] // in_scale, source.shape[3] // in_scale
    th, tw = tiling.spans(lat_h)[1], tiling.spans(lat_w)[1]
    return (source.shape[0], source.shape[1], th * in_scale, tw * in_scale)


def decode(runner: ModelRunner, latents: np.ndarray, factor: int, tiling: Tiling | None) -> np.ndarray:
    """Unscaled latents -> images in [-1, 1]."""
    def run(x: np.ndarray) -> np.ndarray:
        return runner.run({VaeDecoderIO.latent_sample: x})[VaeDecoderIO.sample]

    if tiling is None:
        return run(latents).astype(np.float32)
    tiling = _fitting_batch(runner, tiling, _tile_shape(tiling, latents, 1))
    return run_tiled(run, latents, tiling, 1, factor, 3)


def encode(runner: ModelRunner, images: np.ndarray, factor: int, tiling: Tiling | None) -> np.ndarray:
    """Images in [-1, 1] -> latent parameters (mean and log-variance, concatenated on channels)."""
    def run(x: np.ndarray) -> np.ndarray:
        return runner.run({VaeEncoderIO.sample: x})[VaeEncoderIO.latent_parameters]

    if tiling is None:
        return run(images).astype(np.float32)
    channels = runner.spec.outputs[0].shape[1]
    tiling = _fitting_batch(runner, tiling, _tile_shape(tiling, images, factor))
    return run_tiled(run, images, tiling, factor, 1, channels)


def choose_tiling(latent_h: int, latent_w: int, tile_vae: bool | int | None, native_tile: int, factor: int,
                  channels: int = 128, itemsize: int = 4, budget: int = DEFAULT_BUDGET) -> Tiling | None:
    """The pipeline's tiling: ``tile_vae`` None tiles beyond twice the native side per side (by
    area), True tiles with the largest tile the ``budget`` allows (at most twice the native side),
    an int is a tile edge in image pixels; False or a small enough image: no tiling."""
    if tile_vae is None:
        tile_vae = latent_h * latent_w > (2 * native_tile) ** 2
    if tile_vae is False:
        return None
    if tile_vae is True:
        overlap = min(DEFAULT_OVERLAP, max(native_tile // 4, 1))
        return Tiling.for_budget(budget, factor, channels, itemsize, max(2 * native_tile, overlap + 1), overlap)
    tiling = Tiling.from_pixels(int(tile_vae), factor)
    batch = budget // max(tile_bytes(tiling.tile, tiling.tile, factor, channels, itemsize), 1)
    return Tiling(tiling.tile, tiling.overlap, int(min(max(batch, 1), MAX_BATCH)))


def sample_latents(parameters: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """DiagonalGaussianDistribution.sample: mean + exp(0.5 * clamp(logvar, -30, 20)) * noise."""
    mean, logvar = np.split(parameters.astype(np.float32), 2, axis=1)
    return mean + np.exp(0.5 * np.clip(logvar, -30.0, 20.0)) * noise
