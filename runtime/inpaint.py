"""Inpainting as diffusers' StableDiffusion(XL)InpaintPipeline does it, without PyTorch.

Two kinds of UNet, told apart by the ``sample`` input's channels in the manifest's contract:

* an inpainting UNet (9 channels: the latents, the mask and the masked image's latents,
  concatenated on the channel axis every step, ``Inpainting.unet_input``);
* a regular UNet (4 channels): after each scheduler step the unmasked region is replaced by the
  init image's latents noised to the next timestep (``Inpainting.blend``).

The mask is prepared exactly as diffusers' mask processor (``VaeImageProcessor(do_normalize=False,
do_binarize=True, do_convert_grayscale=True)``) prepares it: a PIL mask is resized to the request's
size with Lanczos in its own mode, converted to grayscale ("L"), scaled to [0, 1] and binarised at
0.5; an array is resized with nearest-neighbour (torch's ``interpolate`` default) and binarised.
The latent-size mask is then taken with nearest-neighbour as well (``prepare_mask_latents``).

A mask whose proportions differ from the init image's (by more than ``ASPECT_TOLERANCE``) is
refused: diffusers would stretch it, which moves the masked region off what it was drawn over.
Any other size is resized like diffusers. Random numbers are drawn in diffusers' order (init image
encoding, initial noise, masked-image encoding), so a seed gives diffusers' image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .contract import UNET, UNetIO
from .manifest import ManifestError
from .request import GenerationError

ASPECT_TOLERANCE = 0.01
"""Relative difference of width/height between mask and init image above which a mask is refused."""


def unet_extra_channels(manifest: Any) -> int:
    """Input channels the UNet takes beyond the latents: 0 (regular) or latents + 1 (inpainting)."""
    latent = manifest.pipeline.latent_channels
    sample = manifest.components[UNET.name].input(UNetIO.sample).shape[1]
    if sample == latent:
        return 0
    if sample == 2 * latent + 1:
        return latent + 1
    raise ManifestError(f"the exported UNet takes {sample} input channels; the runtime supports {latent} "
                        f"(text to image, inpainting by blending) or {2 * latent + 1} (an inpainting UNet): "
                        f"re-export the model")


def check_request(request: Any, extra_channels: int) -> None:
    """What an inpainting request can get wrong before any image is read."""
    if request.mask_image is None:
        if extra_channels:
            raise GenerationError("this export's UNet is an inpainting UNet (9 input channels): pass an "
                                  "init image and mask_image (--init-image, --mask-image), or export a "
                                  "text-to-image model")
        return
    if request.image is None:
        raise GenerationError("mask_image needs an init image to inpaint: pass image= (--init-image)")


def source_size(source: Any) -> tuple[int, int] | None:
    """(width, height) of an init image given as a path or PIL image, without decoding it; None if unknown."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, Path)):
        try:
            with Image.open(source) as opened:
                return opened.size
        except (OSError, UnidentifiedImageError):
            return None
    return getattr(source, "size", None)


def load_mask(source: Any, width: int, height: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """A path, PIL image or array (HxW, HxWx1, 1xHxW) -> [1, 1, height, width] float32 of 0 and 1.

    ``image_size``: the init image's (width, height), to refuse a mask of other proportions."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, Path)):
        try:
            with Image.open(source) as opened:
                opened.load()
                source = opened.copy()
        except (OSError, UnidentifiedImageError) as exc:
            raise GenerationError(f"cannot read mask image {source}: {exc}") from None
    if isinstance(source, Image.Image):
        _check_aspect(source.size, image_size)
        try:  # diffusers' order: resize in the image's own mode, then to grayscale
            gray = source.resize((width, height), resample=Image.LANCZOS).convert("L")
        except (ValueError, OSError) as exc:
            raise GenerationError(f"cannot convert the {source.mode} mask to one channel ({exc}); pass a "
                                  f"grayscale or RGB mask") from None
        mask = np.asarray(gray, dtype=np.float32)[None, None] / np.float32(255.0)
    elif isinstance(source, np.ndarray):
        mask = _array_mask(source)
        _check_aspect((mask.shape[3], mask.shape[2]), image_size)
        mask = nearest(mask, height, width)
    else:
        raise GenerationError(f"mask_image must be a path, a PIL image or a numpy array, got "
                              f"{type(source).__name__}")
    return binarize(mask)


def _array_mask(array: np.ndarray) -> np.ndarray:
    shape = array.shape
    if array.ndim == 3 and 1 in (shape[0], shape[2]):
        array = array.reshape(shape[1:] if shape[0] == 1 else shape[:2])
    if array.ndim != 2 or min(array.shape) < 1:
        raise GenerationError(f"a mask array must have one channel (HxW, HxWx1 or 1xHxW), got shape {shape}; "
                              f"convert it to grayscale first")
    if array.dtype.kind not in "biuf":
        raise GenerationError(f"a mask array must hold numbers, got dtype {array.dtype}")
    mask = array.astype(np.float32)
    if not np.isfinite(mask).all():
        raise GenerationError("the mask array contains NaN or infinite values")
    return mask[None, None]


def _check_aspect(mask_size: tuple[int, int], image_size: tuple[int, int] | None) -> None:
    if image_size is None:
        return
    (mw, mh), (iw, ih) = mask_size, image_size
    if abs((mw / mh) / (iw / ih) - 1) > ASPECT_TOLERANCE:
        raise GenerationError(f"the mask is {mw}x{mh} but the init image is {iw}x{ih}: their proportions "
                              f"differ, so resizing would move the masked region; pass a mask drawn on the "
                              f"init image")


def binarize(mask: np.ndarray) -> np.ndarray:
    """VaeImageProcessor.binarize: below 0.5 -> 0, else 1."""
    return (mask >= 0.5).astype(np.float32)


def nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch's interpolate(mode="nearest") on NCHW: source index floor(i * in / out), in float32."""
    def index(size_in: int, size_out: int) -> np.ndarray:
        if size_in == size_out:
            return np.arange(size_out)
        scale = np.float32(size_in) / np.float32(size_out)
        source = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
        return np.minimum(source, size_in - 1)

    return array[:, :, index(array.shape[2], height)][:, :, :, index(array.shape[3], width)]


def encoder_calls(extra_channels: int, strength: float, given_latents: bool) -> int:
    """VAE encoder calls at the same shape: the init image (regular UNet, or strength < 1 without
    latents) and the masked image (inpainting UNet)."""
    init = extra_channels == 0 or (strength < 1.0 and not given_latents)
    return int(init) + int(extra_channels > 0)


@dataclass
class Inpainting:
    """One generation's inpainting state; batch-sized arrays (CFG duplicates them with the sample)."""

    mask: np.ndarray
    """[batch, 1, h, w] 0/1 at latent size; 1 where the image is regenerated."""
    masked_latents: np.ndarray | None
    """[batch, 4, h, w] latents of the init image with the masked region blacked out (9-channel UNet)."""
    image_latents: np.ndarray | None
    """[batch, 4, h, w] latents of the init image (blending with a regular UNet)."""
    noise: np.ndarray
    """The initial noise, re-applied to ``image_latents`` at each step's next timestep."""

    def unet_input(self, model_input: np.ndarray) -> np.ndarray:
        """The scaled latents, with the mask and masked-image latents appended for an inpainting UNet."""
        if self.masked_latents is None:
            return model_input
        return np.concatenate([model_input, self.mask, self.masked_latents], axis=1)

    def blend(self, latents: np.ndarray, index: int, timesteps: Any, sched: Any) -> np.ndarray:
        """After step ``index``: keep the regenerated region, the init image elsewhere (regular UNet)."""
        if self.image_latents is None:
            return latents
        known = self.image_latents
        if index < len(timesteps) - 1:
            known = sched.add_noise(known, self.noise, np.asarray(timesteps[index + 1:index + 2]))
        return ((1 - self.mask) * known + self.mask * latents).astype(np.float32)


def prepare(pipe: Any, plan: Any, sched: Any, generator: Any,
            tiling: Any) -> tuple[Any, np.ndarray, Inpainting]:
    """Timesteps, initial latents and the inpainting state, drawing random numbers in diffusers' order."""
    timesteps = pipe._start_timesteps(plan, sched)
    extra = unet_extra_channels(pipe.manifest)
    shape = pipe._latent_shape(plan)
    strength_max = plan.strength == 1.0

    def repeat(array: np.ndarray) -> np.ndarray:
        times = plan.batch // array.shape[0]
        return np.concatenate([array] * times) if times > 1 else array

    image_latents = None
    if extra == 0 or (plan.latents is None and not strength_max):
        image_latents = repeat(pipe._encode_latents(plan.init_image, generator, tiling))
    if plan.latents is not None:
        noise = plan.latents
        latents = noise * np.float32(sched.init_noise_sigma)
    else:
        noise = generator.randn(shape)
        if strength_max:
            latents = noise * np.float32(sched.init_noise_sigma)
        else:
            latents = sched.add_noise(image_latents, noise, np.repeat(np.asarray(timesteps[:1]), plan.batch))
    masked = plan.init_image * (plan.mask < 0.5)
    if extra:
        masked_latents = repeat(pipe._encode_latents(masked, generator, tiling))
    else:  # diffusers encodes it anyway: draw its sample's noise so later draws stay in step
        generator.randn((1, shape[1], *shape[2:]))
        masked_latents = None
    mask = repeat(nearest(plan.mask, shape[2], shape[3]))
    blend_with = None if extra else image_latents
    return timesteps, latents.astype(np.float32), Inpainting(mask, masked_latents, blend_with, noise)


def check_mask_file(mask: str, init: str | None) -> None:
    """The CLI's check before any model loads: --mask-image needs --init-image, and must be a readable
    one-channel-convertible image of the init image's proportions. Raises CliError (one line)."""
    from .cli_checks import CliError

    if init is None:
        raise CliError("--mask-image needs --init-image (the image to inpaint)")
    try:
        load_mask(mask, 8, 8, source_size(init))
    except GenerationError as exc:
        raise CliError(str(exc)) from None
