"""A generation request as a caller writes it, and the checks it must pass before any model runs.

``GenerationRequest`` carries diffusers' argument names and defaults; ``Pipeline.plan`` turns it
into a ``Plan`` (every size resolved, the scheduler chosen) or raises ``GenerationError`` with one
line. The number checks live here so that the CLI, the Python API and a service refuse the same
things the same way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CFG_MODES = ("batched", "sequential")
OUTPUT_TYPES = ("pil", "np")
MAX_STEPS = 1000
MAX_SEED = 2**64 - 1


class GenerationError(ValueError):
    """A request that cannot be run: the message says what to change."""


@dataclass
class GenerationRequest:
    """What to generate; the field names follow diffusers' pipelines."""

    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 50
    guidance_scale: float | None = None
    """None: the model family's default (7.5, SD-XL 5.0)."""
    seed: int | None = None
    """None: a random seed, reported in the output."""
    scheduler: str | None = None
    """None: the exported scheduler's class."""
    num_images_per_prompt: int = 1
    latents: np.ndarray | None = None
    image: Any = None
    """Init image for img2img (a path or a PIL image)."""
    strength: float | None = None
    output_type: str = "pil"
    guidance_rescale: float = 0.0
    cfg_mode: str = "batched"
    tile_vae: bool | int | None = None
    """None: tiled beyond twice the model's native size per side; True: tiles as large as the VAE
    budget allows; an int: the tile edge in image pixels (``runtime.vae.choose_tiling``)."""
    memory_limit: int | str | None = None
    """Bytes (or "12G") this generation may use in all; None: the pipeline's limit, else the memory
    available now (``runtime.memory``). A request estimated above it is refused before any model runs."""
    hires: Any = None
    """The staged ultra-high-resolution chain (``runtime.hires``): "auto", "off" or a ``Hires``;
    None: one pass at the requested size, as diffusers' pipelines do."""
    mask_image: Any = None
    """Inpainting: white where ``image`` is regenerated (a path, PIL image or HxW array); see ``runtime.inpaint``."""
    control_image: Any = None
    """ControlNet exports: the control image (a path or PIL image; a list, one per ControlNet)."""
    controlnet_conditioning_scale: float | Sequence[float] | None = None
    """None: 1.0. Also ``control_guidance_start`` (None: 0.0) and ``control_guidance_end`` (None: 1.0):
    the share of the schedule each ControlNet runs in (``runtime.controlnet``)."""
    control_guidance_start: float | Sequence[float] | None = None
    control_guidance_end: float | Sequence[float] | None = None


@dataclass
class Plan:
    """A validated request with every size resolved."""

    prompts: list[str]
    negative: list[str] | None
    height: int
    width: int
    steps: int
    guidance_scale: float
    guidance_rescale: float
    scheduler: str
    images_per_prompt: int
    cfg_mode: str
    seed: int
    output_type: str
    tile_vae: bool | int | None
    strength: float | None = None
    init_image: np.ndarray | None = None
    latents: np.ndarray | None = None
    memory: Any = None
    """The memory estimate the plan was admitted with (``runtime.memory.Estimate``)."""
    mask: np.ndarray | None = None
    """Inpainting: [1, 1, height, width] of 0 and 1, as diffusers' mask processor makes it."""
    control: Any = None
    """ControlNet arguments, checked (``runtime.controlnet.ControlPlan``)."""

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def unet_batch(self) -> int:
        """The UNet's batch per call: doubled by batched classifier-free guidance."""
        return self.batch * (2 if self.cfg and self.cfg_mode == "batched" else 1)


def finite(name: str, value: Any, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> float:
    """``value`` as a float that is finite and inside [low, high] ((low, high] with ``low_open``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GenerationError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise GenerationError(f"{name} must be a finite number, got {value!r}")
    below = number <= low if low_open else number < low if low is not None else False
    if (low is not None and below) or (high is not None and number > high):
        interval = f"{'(' if low_open else '['}{'-inf' if low is None else f'{low:g}'}, " \
                   f"{'inf' if high is None else f'{high:g}'}]"
        raise GenerationError(f"{name} must be in {interval}, got {number:g}")
    return number


def whole(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high]; floats with a fractional part and bools are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        else:
            raise GenerationError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if value < low:
        raise GenerationError(f"{name} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise GenerationError(f"{name} must be at most {high}, got {value}")
    return value


def prompt_lists(prompt: Any, negative_prompt: Any) -> tuple[list[str], list[str] | None]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if not prompts:
        raise GenerationError("no prompt given")
    if not all(isinstance(p, str) for p in prompts):
        raise GenerationError("prompts must be strings")
    negative = None
    if negative_prompt is not None:
        negative = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negative) != len(prompts):
            raise GenerationError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
    return prompts, negative


def check_numbers(request: GenerationRequest, default_guidance: float) -> dict[str, Any]:
    """Every number of a request, checked and normalised (before any model runs)."""
    if request.output_type not in OUTPUT_TYPES:
        raise GenerationError(f"output_type must be 'pil' or 'np', got {request.output_type!r}")
    if request.cfg_mode not in CFG_MODES:
        raise GenerationError(f"cfg_mode must be one of {', '.join(CFG_MODES)}, got {request.cfg_mode!r}")
    guidance = default_guidance if request.guidance_scale is None else request.guidance_scale
    checked = {
        "steps": whole("num_inference_steps", request.num_inference_steps, 1, MAX_STEPS),
        "images_per_prompt": whole("num_images_per_prompt", request.num_images_per_prompt, 1),
        "guidance_scale": finite("guidance_scale", guidance, 0.0),
        "guidance_rescale": finite("guidance_rescale", request.guidance_rescale, 0.0, 1.0),
        "seed": (int.from_bytes(os.urandom(4), "little") if request.seed is None
                 else whole("seed", request.seed, 0, MAX_SEED)),
        "strength": None,
    }
    if request.strength is not None:
        if request.image is None:
            raise GenerationError("strength is only used with an init image")
        checked["strength"] = finite("strength", request.strength, 0.0, 1.0, low_open=True)
    for side in ("height", "width"):
        value = getattr(request, side)
        checked[side] = None if value is None else whole(side, value, 1)
    return checked
