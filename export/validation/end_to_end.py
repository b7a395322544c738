"""End to end: the torch-free runtime against diffusers, from the same initial latents.

Both sides run the same prompt with Euler (deterministic: no noise is drawn after the initial
latents), so any difference comes from the exported models and the runtime's loop. The images
are compared by PSNR and by the largest difference in 8-bit levels. The diffusers side imports
torch only inside its function, so a torch-free machine can compare against saved images.

An export whose UNet is an inpainting UNet (9 input channels) cannot generate from a prompt alone,
so its case is inpainting: both sides get the same synthetic init image and rectangular mask (made
from the seed and size, ``EndToEndSettings.init_image``/``mask_image``), the same latents at
strength 1, and the same seed, which draws the masked image's VAE posterior sample (the runtime
reproduces torch's CPU generator, diffusers gets ``torch.Generator("cpu").manual_seed(seed)``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..comparison import ImageTolerance

TEXT_TO_IMAGE, INPAINTING = "text-to-image", "inpainting"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry, low quality"


@dataclass
class EndToEndSettings:
    width: int
    height: int
    steps: int = 8
    guidance_scale: float = 6.0
    scheduler: str = "euler"
    seed: int = 0
    prompt: str = PROMPT
    negative_prompt: str = NEGATIVE
    case: str = TEXT_TO_IMAGE
    """TEXT_TO_IMAGE, or INPAINTING (an inpainting UNet: init image, mask and seed on both sides)."""

    def __post_init__(self) -> None:
        if self.case not in (TEXT_TO_IMAGE, INPAINTING):
            raise ValueError(f"unknown end-to-end case {self.case!r}; expected {TEXT_TO_IMAGE} or {INPAINTING}")

    @property
    def inpainting(self) -> bool:
        return self.case == INPAINTING

    def init_image(self):
        """A smooth colour field with a seeded phase (PIL RGB, the request's size): the VAE sees structure."""
        from PIL import Image

        rng = np.random.default_rng([self.seed, 1])
        y, x = np.mgrid[0:self.height, 0:self.width] / np.float64(max(self.width, self.height))
        phase, freq = rng.uniform(0, 2 * np.pi, 3), rng.uniform(2, 6, 3)
        channels = [0.5 + 0.45 * np.sin(freq[c] * (x + (c - 1) * y) * np.pi + phase[c]) for c in range(3)]
        return Image.fromarray(np.round(np.stack(channels, axis=-1) * 255).astype(np.uint8), "RGB")

    def mask_image(self):
        """White (regenerate) over a rectangle covering the middle half of each side, black elsewhere (PIL L)."""
        from PIL import Image

        mask = np.zeros((self.height, self.width), np.uint8)
        mask[self.height // 4:self.height * 3 // 4, self.width // 4:self.width * 3 // 4] = 255
        return Image.fromarray(mask, "L")

    def latents(self, channels: int, vae_factor: int) -> np.ndarray:
        shape = (1, channels, self.height // vae_factor, self.width // vae_factor)
        return np.random.default_rng(self.seed).standard_normal(shape).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EndToEndResult:
    backend: str
    size: tuple[int, int]
    steps: int
    scheduler: str
    psnr: float
    max_pixel_diff: int
    passed: bool
    tolerance: dict[str, Any]
    error: str | None = None
    case: str = TEXT_TO_IMAGE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def case_for(manifest: Any) -> str:
    """The end-to-end case an export can run: INPAINTING for an inpainting UNet, else TEXT_TO_IMAGE.

    Raises ValueError (one line) for an export the end-to-end check cannot drive."""
    from linfusion.runtime.contract import UNET
    from linfusion.runtime.inpaint import unet_extra_channels
    from linfusion.runtime.manifest import ManifestError

    if UNET.name not in manifest.components:
        raise ValueError("the end-to-end check needs the export's UNet; export it, or drop --end-to-end")
    try:
        return INPAINTING if unet_extra_channels(manifest) else TEXT_TO_IMAGE
    except ManifestError as exc:
        raise ValueError(f"{exc}; or drop --end-to-end") from None


def runtime_image(export_dir: Path, backend: str, settings: EndToEndSettings, latents: np.ndarray,
                  providers: list[str] | None = None) -> np.ndarray:
    from linfusion.runtime import Pipeline

    pipe = Pipeline.from_export(export_dir, backend=backend, providers=providers, verify=False)
    inpaint = ({"image": settings.init_image(), "mask_image": settings.mask_image(), "strength": 1.0,
                "seed": settings.seed} if settings.inpainting else {})
    return pipe(settings.prompt, negative_prompt=settings.negative_prompt, height=settings.height,
                width=settings.width, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                scheduler=settings.scheduler, latents=latents, output_type="np", **inpaint).images


def diffusers_image(pipeline, settings: EndToEndSettings, latents: np.ndarray,
                    scheduler_config: dict[str, Any]) -> np.ndarray:
    """diffusers' own pipeline (LinFusion mounted) with Euler and the same latents.

    Euler is configured from the export's saved scheduler config, as the runtime is: the
    in-memory config of a rebuilt pipeline may lack keys (timestep_spacing) whose defaults differ
    between scheduler classes.

    The pipeline stops at the latents and the VAE decodes them in its own dtype, as the runtime
    does; diffusers' SD-XL pipeline would otherwise feed fp16 latents to an fp32 (force_upcast) VAE.

    Inpainting: ``pipeline`` is the preset's inpainting pipeline; it gets the settings' init image and
    mask at strength 1 and a CPU generator seeded as the runtime is.
    """
    import torch
    from diffusers import EulerDiscreteScheduler

    if settings.scheduler != "euler":
        raise ValueError(f"the end-to-end check uses euler, not {settings.scheduler}")
    pipeline.scheduler = EulerDiscreteScheduler.from_config(scheduler_config)
    pipeline.set_progress_bar_config(disable=True)
    vae = pipeline.vae
    inpaint = ({"image": settings.init_image(), "mask_image": settings.mask_image(), "strength": 1.0,
                "generator": torch.Generator("cpu").manual_seed(settings.seed)} if settings.inpainting else {})
    with torch.no_grad():
        out = pipeline(settings.prompt, negative_prompt=settings.negative_prompt, height=settings.height,
                       width=settings.width, num_inference_steps=settings.steps,
                       guidance_scale=settings.guidance_scale, output_type="latent",
                       latents=torch.from_numpy(latents).to(pipeline.unet.dtype), **inpaint).images
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        decoded = vae.decode(out.to(vae.dtype) / vae.config.scaling_factor + shift, return_dict=False)[0]
        images = pipeline.image_processor.postprocess(decoded.float(), output_type="np")
    return np.asarray(images, dtype=np.float32)


def compare_images(backend: str, settings: EndToEndSettings, got: np.ndarray, expected: np.ndarray,
                   tolerance: ImageTolerance) -> EndToEndResult:
    got64, exp64 = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    size = (settings.width, settings.height)
    if got64.shape != exp64.shape:
        return EndToEndResult(backend, size, settings.steps, settings.scheduler, 0.0, 255, False,
                              tolerance.to_dict(), f"image shapes differ: {got64.shape} vs {exp64.shape}",
                              settings.case)
    mse = float(np.mean((got64 - exp64) ** 2))
    psnr = float("inf") if mse == 0 else float(10.0 * np.log10(1.0 / mse))
    if not np.isfinite(got64).all():
        psnr = 0.0
    levels = np.abs(np.round(np.clip(got64, 0, 1) * 255) - np.round(np.clip(exp64, 0, 1) * 255))
    max_diff = int(levels.max()) if levels.size else 0
    passed = bool(psnr >= tolerance.psnr and max_diff <= tolerance.max_pixel_diff)
    return EndToEndResult(backend, size, settings.steps, settings.scheduler, psnr, max_diff, passed,
                          tolerance.to_dict(), case=settings.case)
