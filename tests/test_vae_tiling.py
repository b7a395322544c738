"""Tiled VAE at scale (runtime/vae.py): even layout, fixed overlap, batched tiles, budgeted tile size."""

import itertools
import math

import numpy as np
import pytest
from linfusion.runtime import vae
from linfusion.runtime.request import GenerationError
from linfusion.runtime.vae import Tiling, choose_tiling, run_tiled, tile_bytes
from PIL import Image


def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


# ---- layout and budget, by hand -----------------------------------------------------------------

def test_even_layout_by_hand():
    # 256 latent px, tiles <= 64, overlap >= 8: ceil(248 / 56) = 5 tiles of ceil(288 / 5) = 58,
    # starts round(i * 198 / 4) = 0, 50 (49.5 rounds to even), 99, 148 (148.5), 198.
    assert Tiling(64, 8).spans(256) == ([0, 50, 99, 148, 198], 58)
    # 2048 (a 16384-px side) with tiles <= 128: ceil(2040 / 120) = 17 tiles of ceil(2176 / 17) = 128.
    starts, size = Tiling(128, 8).spans(2048)
    assert (len(starts), size, starts[-1]) == (17, 128, 1920)
    assert Tiling(64, 8).spans(64) == ([0], 64) and Tiling(64, 8).spans(40) == ([0], 40)


@pytest.mark.parametrize("tile,overlap", [(16, 4), (64, 8), (128, 8), (33, 32)])
def test_layout_covers_with_the_fixed_overlap_and_the_fewest_tiles(tile, overlap):
    tiling = Tiling(tile, overlap)
    for length in range(tile + 1, 6 * tile):
        starts, size = tiling.spans(length)
        assert size <= tile and starts[0] == 0 and starts[-1] + size == length
        assert all(a + size - b >= overlap for a, b in itertools.pairwise(starts))
        # one tile fewer could not cover the length with that overlap
        n = len(starts) - 1
        assert n * tile - (n - 1) * overlap < length


def test_budget_picks_the_largest_tile_that_fits_by_hand():
    # SD VAE (128 channels, factor 8, fp32): 4 * (17 * 128 * (8 t)^2 + 3 * (t^2)^2) bytes per tile.
    assert tile_bytes(80, 80, 8) == 4 * (17 * 128 * 409600 + 3 * 6400**2) == 4_056_678_400
    assert tile_bytes(88, 88, 8) == 4 * (17 * 128 * 495616 + 3 * 7744**2) > 2**32
    assert Tiling.for_budget(2**32, 8) == Tiling(80, 8, 1)
    # fp16 halves every byte: 4 GiB hold a 104 tile but not a 112 one.
    assert tile_bytes(104, 104, 8, itemsize=2) == 2 * (17 * 128 * 692224 + 3 * 10816**2) < 2**32
    assert tile_bytes(112, 112, 8, itemsize=2) == 2 * (17 * 128 * 802816 + 3 * 12544**2) > 2**32
    assert Tiling.for_budget(2**32, 8, itemsize=2).tile == 104
    # a small tile under a large budget runs in batches, at most MAX_BATCH
    assert Tiling.for_budget(2**34, 8, max_tile=32) == Tiling(32, 8, vae.MAX_BATCH)
    assert Tiling.for_budget(3 * tile_bytes(32, 32, 8), 8, max_tile=32).batch == 3


def test_choose_tiling():
    assert choose_tiling(128, 128, None, 64, 8) is None  # not beyond twice the native side
    assert choose_tiling(128, 136, None, 64, 8) is not None
    assert choose_tiling(2048, 1024, False, 64, 8) is None
    assert choose_tiling(64, 64, 1024, 64, 8).tile == 128  # an int is a tile edge in image pixels
    assert choose_tiling(64, 64, True, 64, 8) == Tiling(80, 8, 1)
    assert choose_tiling(64, 64, True, 16, 8, channels=32).tile == 32  # at most twice the native side
    with pytest.raises(ValueError, match="multiple of 8"):
        choose_tiling(64, 64, 1020, 64, 8)
    with pytest.raises(ValueError, match="overlap"):
        Tiling(8, 8)


# ---- blending against an independent per-pixel computation --------------------------------------

def tile_dependent(x):
    """A non-local stand-in decoder: x4 upsampling plus each tile's own mean, so tiles disagree."""
    up = np.kron(x[:, :3], np.ones((1, 1, 4, 4), dtype=np.float32))
    return up + x.mean(axis=(1, 2, 3), keepdims=True)


def reference_blend(source, tile, overlap, scale):
    """The blend computed pixel by pixel in float64: every tile covering a pixel weighs in with a
    linear ramp over ``overlap * scale`` output pixels on each side that has a neighbour."""
    lat_h, lat_w = source.shape[2:]

    def layout(length):  # the same even layout, derived again from its definition
        if length <= tile:
            return [0], length
        n = math.ceil((length - overlap) / (tile - overlap))
        size = math.ceil((length + (n - 1) * overlap) / n)
        return [round(i * (length - size) / (n - 1)) for i in range(n)], size

    (ys, th), (xs, tw) = layout(lat_h), layout(lat_w)
    fade = overlap * scale

    def weight(p, start, size, first, last):
        w = 1.0
        if not first:
            w = min(w, (p - start * scale + 0.5) / fade)
        if not last:
            w = min(w, ((start + size) * scale - p - 0.5) / fade)
        return w

    outputs = {(y, x): tile_dependent(source[:, :, y:y + th, x:x + tw]).astype(np.float64)
               for y in ys for x in xs}
    out = np.zeros((source.shape[0], 3, lat_h * scale, lat_w * scale))
    for py in range(lat_h * scale):
        for px in range(lat_w * scale):
            num, den = 0.0, 0.0
            for i, y in enumerate(ys):
                if not y * scale <= py < (y + th) * scale:
                    continue
                for j, x in enumerate(xs):
                    if not x * scale <= px < (x + tw) * scale:
                        continue
                    w = (weight(py, y, th, i == 0, i == len(ys) - 1)
                         * weight(px, x, tw, j == 0, j == len(xs) - 1))
                    num = num + w * outputs[y, x][:, :, py - y * scale, px - x * scale]
                    den += w
            out[:, :, py, px] = num / den
    return out


@pytest.mark.parametrize("h,w,tile,overlap,batch", [(20, 30, 12, 3, 1), (20, 30, 12, 3, 4), (9, 40, 16, 4, 3)])
def test_blend_matches_an_independent_per_pixel_computation(h, w, tile, overlap, batch):
    source = np.random.default_rng(3).standard_normal((2, 4, h, w)).astype(np.float32)
    ours = run_tiled(tile_dependent, source, Tiling(tile, overlap, batch), 1, 4, 3)
    expected = reference_blend(source, tile, overlap, 4)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6)


class ProfileLimitedDecoder:
    """A decoder whose engine takes at most 2 images per call (like a TensorRT profile)."""

    def __init__(self):
        self.input_names = ["latent_sample"]
        self.batches = []

    def check_shapes(self, shapes):
        from linfusion.runtime.backends.base import ShapeError

        if shapes["latent_sample"][0] > 2:
            raise ShapeError("outside the profile")

    def run(self, inputs):
        x = inputs["latent_sample"]
        self.batches.append(x.shape[0])
        return {"sample": tile_dependent(x)}


def test_batches_shrink_to_what_the_engine_takes():
    latents = np.random.default_rng(4).standard_normal((1, 4, 30, 30)).astype(np.float32)
    runner = ProfileLimitedDecoder()
    ours = vae.decode(runner, latents, 4, Tiling(12, 3, 8))
    assert max(runner.batches) == 2 and sum(runner.batches) == 9  # 3 x 3 tiles, 2 per call
    np.testing.assert_array_equal(ours, run_tiled(tile_dependent, latents, Tiling(12, 3, 1), 1, 4, 3))


# ---- the tiny-sd VAE on ONNX Runtime ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(exported):
    from linfusion.runtime import Pipeline

    return Pipeline.from_export(exported("tiny-sd"), backend="onnxruntime")


def encoded_latents(pipe, height=256, width=320):
    """Latents of an image-like input (the tiny encoder's mean of a smooth synthetic picture)."""
    from linfusion.runtime.images import load_image

    y, x = np.mgrid[0:height, 0:width] / np.float32(max(height, width))
    picture = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), np.sin(9 * x * y)], axis=-1)
    image = Image.fromarray(((picture * 0.5 + 0.5) * 255).astype(np.uint8))
    parameters = vae.encode(pipe.runner("vae_encoder"), load_image(image, width, height, 32), 8, None)
    return np.split(parameters, 2, axis=1)[0]


@pytest.fixture(scope="module")
def generated(tiny):
    """The unscaled latents the tiny pipeline hands its VAE decoder (256x320 px, 8 steps)."""
    captured, original = {}, vae.decode

    def grab(runner, latents, factor, tiling):
        captured["latents"] = latents.copy()
        return original(runner, latents, factor, tiling)

    vae.decode = grab
    try:
        tiny("a red apple on a wooden table", height=256, width=320, num_inference_steps=8, seed=1,
             scheduler="euler", tile_vae=False)
    finally:
        vae.decode = original
    return captured["latents"]


def test_batched_tiles_equal_unbatched_tiles_exactly(tiny):
    decoder, encoder = tiny.runner("vae_decoder"), tiny.runner("vae_encoder")
    latents = encoded_latents(tiny)
    one = vae.decode(decoder, latents, 8, Tiling(16, 4, 1))
    for batch in (2, 4, 9):  # 9 = all 3 x 3 tiles in one call; 2 and 4 leave a partial last call
        assert np.array_equal(vae.decode(decoder, latents, 8, Tiling(16, 4, batch)), one)
    images = np.clip(one, -1, 1)
    assert np.array_equal(vae.encode(encoder, images, 8, Tiling(16, 4, 4)),
                          vae.encode(encoder, images, 8, Tiling(16, 4, 1)))


def test_tiled_decode_stays_close_to_the_full_decode(tiny, generated):
    """On generated latents; the measured figures for the real-size VAE are in
    benchmarks/results/vae_tiling.json (image-like latents are much harder, see docs/hires.md)."""
    decoder = tiny.runner("vae_decoder")

    def unit(images):
        return np.clip(images / 2 + 0.5, 0, 1)

    full = unit(vae.decode(decoder, generated, 8, None))
    tiled = unit(vae.decode(decoder, generated, 8, Tiling(24, 8, 4)))  # 2 x 2 tiles of 20 x 24
    seams = unit(vae.decode(decoder, generated, 8, Tiling(24, 0, 4)))  # no overlap: hard seams
    assert not np.array_equal(tiled, full)
    assert psnr(tiled, full) >= 38
    assert psnr(tiled, full) > psnr(seams, full) + 3


def test_pipeline_takes_a_tile_size_in_pixels(tiny):
    args = {"height": 256, "width": 320, "num_inference_steps": 2, "seed": 3, "output_type": "np"}
    sized = tiny("a red apple", tile_vae=128, **args).images  # 16-latent tiles
    assert tiny.tiling(32, 40, 128) == Tiling(16, vae.DEFAULT_OVERLAP, vae.MAX_BATCH)
    full = tiny("a red apple", tile_vae=False, **args).images
    assert psnr(sized, full) >= 25 and not np.array_equal(sized, full)
    with pytest.raises(GenerationError, match="multiple of 8") as info:
        tiny("a red apple", tile_vae=100, **args)
    assert "\n" not in str(info.value)
