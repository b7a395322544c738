"""Inpainting masks: the torch-free preparation against diffusers' own mask processor, and refusals."""

import numpy as np
import pytest
import torch
from linfusion.runtime.inpaint import Inpainting, load_mask, nearest
from linfusion.runtime.request import GenerationError
from PIL import Image


def mask_processor():
    from diffusers.image_processor import VaeImageProcessor

    # as StableDiffusion(XL)InpaintPipeline builds it
    return VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                             do_convert_grayscale=True)


def soft_mask(width, height, seed=0):
    """A blurred blob with values all over [0, 255], so binarisation and Lanczos both matter."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    blob = 255 * np.exp(-((x - width * 0.4) ** 2 + (y - height * 0.6) ** 2) / (0.1 * width * height))
    return np.clip(blob + rng.normal(0, 40, blob.shape), 0, 255).astype(np.uint8)


def pil_masks():
    gray = soft_mask(120, 80)
    rgb = np.stack([gray, np.roll(gray, 7, axis=1), 255 - gray], axis=-1)
    return {"L": Image.fromarray(gray), "RGB": Image.fromarray(rgb),
            "RGBA": Image.fromarray(np.dstack([rgb, gray[::-1]])), "1": Image.fromarray(gray).convert("1"),
            "P": Image.fromarray(rgb).convert("P")}


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "1", "P"])
@pytest.mark.parametrize("size", [(120, 80), (96, 64), (192, 128)])
def test_pil_masks_match_diffusers_mask_processor(mode, size):
    source = pil_masks()[mode]
    width, height = size
    ours = load_mask(source, width, height, (120, 80))
    theirs = mask_processor().preprocess(source, height=height, width=width).numpy()
    assert ours.shape == theirs.shape == (1, 1, height, width)
    assert set(np.unique(ours)) <= {0.0, 1.0}
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("shape", [(80, 120), (80, 120, 1), (1, 80, 120)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_array_masks_match_diffusers_mask_processor(shape, dtype):
    values = soft_mask(120, 80, seed=1).astype(np.float64) / 255
    array = ((values > 0.5) * 255 if dtype == np.uint8 else values).astype(dtype).reshape(shape)
    ours = load_mask(array, 96, 64)
    theirs = mask_processor().preprocess(array, height=64, width=96).float().numpy()
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("size_in,size_out", [((64, 96), (8, 12)), ((80, 120), (13, 7)), ((5, 7), (16, 11)),
                                              ((512, 768), (64, 96))])
def test_nearest_resize_is_torch_interpolate(size_in, size_out):
    array = np.random.default_rng(3).random((2, 1, *size_in)).astype(np.float32)
    theirs = torch.nn.functional.interpolate(torch.from_numpy(array), size=size_out).numpy()
    assert np.array_equal(nearest(array, *size_out), theirs)


def test_mask_files_are_read_like_pil_masks(tmp_path):
    source = pil_masks()["RGB"]
    source.save(tmp_path / "mask.png")
    assert np.array_equal(load_mask(tmp_path / "mask.png", 96, 64), load_mask(source, 96, 64))


@pytest.mark.parametrize("source,message", [
    (np.zeros((64, 96, 3)), "one channel"),
    (np.zeros((2, 64, 96, 1)), "one channel"),
    (np.full((64, 96), np.nan), "NaN"),
    (np.array([["a"]]), "numbers"),
    (Image.new("LAB", (96, 64)), "cannot convert the LAB mask to one channel"),
    ([[0, 1]], "path, a PIL image or a numpy array"),
    ("/nonexistent/mask.png", "cannot read mask image"),
    (Image.new("L", (64, 64)), "proportions differ"),
])
def test_bad_masks_are_refused_in_one_line(source, message):
    with pytest.raises(GenerationError, match=message) as info:
        load_mask(source, 96, 64, (96, 64))
    assert "\n" not in str(info.value)


def test_blend_keeps_the_init_image_outside_the_mask():
    """diffusers' step: (1 - mask) * add_noise(image_latents, noise, next t) + mask * latents; the last one
    un-noised."""
    from diffusers import DDIMScheduler
    from linfusion.runtime.schedulers import make_scheduler

    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
              "beta_end": 0.012}
    sched = make_scheduler("ddim", config)
    sched.set_timesteps(4)
    reference = DDIMScheduler.from_config(config)
    reference.set_timesteps(4)
    rng = np.random.default_rng(0)
    mask = np.zeros((1, 1, 2, 3), np.float32)
    mask[..., 1:] = 1
    image, noise, latents = (rng.standard_normal((1, 4, 2, 3)).astype(np.float32) for _ in range(3))
    state = Inpainting(mask, None, image, noise)
    out = state.blend(latents, 1, sched.timesteps, sched)
    assert np.array_equal(out[..., 1:], latents[..., 1:])
    noised = reference.add_noise(torch.from_numpy(image), torch.from_numpy(noise), reference.timesteps[2:3])
    noised = noised.numpy()
    assert np.allclose(out[..., :1], noised[..., :1], atol=1e-6)
    last = state.blend(latents, 3, sched.timesteps, sched)
    assert np.array_equal(last[..., :1], image[..., :1])
    assert state.unet_input(latents) is latents


@pytest.mark.parametrize("channels,extra", [(4, 0), (9, 5), (5, None), (8, None)])
def test_unet_kind_comes_from_the_contract(channels, extra):
    from types import SimpleNamespace

    from linfusion.runtime.contract import ComponentSpec, unet_io
    from linfusion.runtime.inpaint import unet_extra_channels
    from linfusion.runtime.manifest import ManifestError

    inputs, outputs = unet_io("float32", channels, 4, 32, 77, None)
    unet = ComponentSpec("unet", "unet/model.onnx", "fp32", inputs, outputs)
    manifest = SimpleNamespace(pipeline=SimpleNamespace(latent_channels=4), components={"unet": unet})
    if extra is None:
        with pytest.raises(ManifestError, match=f"takes {channels} input channels"):
            unet_extra_channels(manifest)
    else:
        assert unet_extra_channels(manifest) == extra
