"""ControlNet in the torch-free runtime: checking a request's control arguments, preparing the
control image, and the residuals the UNet of a ControlNet export takes every step.

As diffusers' StableDiffusion(XL)ControlNetPipeline: the control image is converted to RGB,
resized to the request's size with LANCZOS (a control image of another size is resized, not
refused; without an explicit size the control image's own size, rounded down to the export's
pixel multiple, is the request's), scaled to [0, 1], repeated to the batch and doubled for
batched classifier-free guidance. ControlNet k runs at step i unless
``i / steps < start_k or (i + 1) / steps > end_k``; its residuals are scaled by its
conditioning scale and summed over ControlNets. A ControlNet export's UNet always takes
residuals: plain text-to-image, and steps where every ControlNet is off, feed zeros (their
cost is measured in docs/controlnet.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .contract import CONTROLNET, UNET, Axis, ComponentSpec, ControlNetIO, component_kind
from .request import GenerationError, finite

REMEDY = "re-export with linfusion-export --controlnet MODEL"


def controlnet_names(manifest) -> list[str]:
    """The export's ControlNet components, in export order."""
    return [name for name, spec in manifest.components.items() if component_kind(spec.kind) is CONTROLNET]


def residual_inputs(spec: ComponentSpec) -> list[Any]:
    """The UNet inputs that take ControlNet residuals (none in a plain export)."""
    names = {ControlNetIO.mid_block_residual} | {ControlNetIO.down_block_residual(i) for i in range(len(spec.inputs))}
    return [t for t in spec.inputs if t.name in names]


@dataclass
class ControlPlan:
    """A request's checked control arguments, one entry per ControlNet."""

    names: list[str]
    images: list[np.ndarray]
    """[1 or batch, 3, H, W] float32 in [0, 1]."""
    scales: list[float]
    starts: list[float]
    ends: list[float]
    step: int = 0
    """The denoising step running now (set by the loop)."""
    steps: int = 1
    _images: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def step_scales(self) -> list[float]:
        """Each ControlNet's scale at ``step``: 0 outside its [start, end] share of the schedule."""
        i, n = self.step, self.steps
        return [scale * (1.0 - float(i / n < s or (i + 1) / n > e))
                for scale, s, e in zip(self.scales, self.starts, self.ends)]

    def image(self, index: int, batch: int) -> np.ndarray:
        """ControlNet ``index``'s image for a call of ``batch`` rows (doubled for batched CFG)."""
        key = (index, batch)
        if key not in self._images:
            image = self.images[index]
            self._images[key] = np.concatenate([image] * (batch // image.shape[0]))
        return self._images[key]


def _per_controlnet(name: str, value: Any, count: int, default: float) -> list[Any]:
    if value is None:
        return [default] * count
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise GenerationError(f"{name} has {len(values)} values for {count} ControlNets; give one per ControlNet")
    return values


def plan_control(request, manifest, height: int | None, width: int | None,
                 batch: int) -> tuple[ControlPlan | None, int | None, int | None]:
    """Check the control arguments (before any model runs); returns the plan and the resolved size."""
    given = {"controlnet_conditioning_scale": request.controlnet_conditioning_scale,
             "control_guidance_start": request.control_guidance_start,
             "control_guidance_end": request.control_guidance_end}
    if request.control_image is None:
        stray = [name for name, value in given.items() if value is not None]
        if stray:
            raise GenerationError(f"{stray[0]} is only used with control_image")
        return None, height, width
    names = controlnet_names(manifest)
    if not names:
        raise GenerationError(f"this export has no ControlNet, which control_image needs; {REMEDY}")
    if request.image is not None:
        raise GenerationError("control_image with an init image (ControlNet img2img) is not supported; "
                              "pass one of them")
    sources, scales, starts, ends = check_numbers(request, len(names))
    opened = [open_image(source) for source in sources]
    multiple = manifest.pixel_multiple
    width = width or opened[0].width // multiple * multiple
    height = height or opened[0].height // multiple * multiple
    if width < multiple or height < multiple:
        raise GenerationError(f"control image {opened[0].width}x{opened[0].height} is smaller than {multiple} px; "
                              f"pass --width and --height")
    images = [control_array(image, width, height) for image in opened]
    images = [np.concatenate([a] * batch) for a in images]
    return ControlPlan(names, images, scales, starts, ends), height, width


def check_numbers(request, count: int) -> tuple[list[Any], list[float], list[float], list[float]]:
    """Control images, scales, starts and ends of ``count`` ControlNets (GenerationError, one line)."""
    sources = request.control_image if isinstance(request.control_image, (list, tuple)) else [request.control_image]
    if len(sources) != count:
        raise GenerationError(f"{len(sources)} control image(s) for {count} ControlNet(s) in this export; "
                              f"give one per ControlNet")
    scales = [finite("controlnet_conditioning_scale", v) for v in _per_controlnet(
        "controlnet_conditioning_scale", request.controlnet_conditioning_scale, count, 1.0)]
    starts = [finite("control_guidance_start", v, 0.0, 1.0) for v in _per_controlnet(
        "control_guidance_start", request.control_guidance_start, count, 0.0)]
    ends = [finite("control_guidance_end", v, 0.0, 1.0) for v in _per_controlnet(
        "control_guidance_end", request.control_guidance_end, count, 1.0)]
    for start, end in zip(starts, ends):
        if start >= end:
            raise GenerationError(f"control_guidance_start ({start:g}) must be below control_guidance_end ({end:g})")
    return sources, scales, starts, ends


def open_image(source: str | Path | Any):
    """A path or PIL image -> an RGB PIL image; a one-line error for anything unreadable."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, Path)):
        try:
            with Image.open(source) as opened:
                return opened.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise GenerationError(f"cannot read control image {source}: {exc}") from None
    if not hasattr(source, "convert"):
        raise GenerationError(f"control_image must be a path or a PIL image, got {type(source).__name__}")
    return source.convert("RGB")


def control_array(image, width: int, height: int) -> np.ndarray:
    """RGB PIL image -> [1, 3, height, width] float32 in [0, 1], resized as VaeImageProcessor does."""
    from PIL import Image

    if (image.width, image.height) != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]


def _one_or_each(values: list[float] | None) -> float | list[float] | None:
    return values[0] if values and len(values) == 1 else values


def control_kwargs(args) -> dict[str, Any]:
    """``linfusion-generate``'s --control-* flags as ``Pipeline.__call__`` arguments."""
    images = args.control_image
    return {"control_image": None if not images else images[0] if len(images) == 1 else images,
            "controlnet_conditioning_scale": _one_or_each(args.control_scale),
            "control_guidance_start": _one_or_each(args.control_start),
            "control_guidance_end": _one_or_each(args.control_end)}


def check_cli_arguments(args) -> None:
    """The --control-* flags, checked before any model loads (CliError, one line)."""
    from .cli_checks import CliError
    from .manifest import ManifestError, load_manifest

    flags = {"--control-scale": args.control_scale, "--control-start": args.control_start,
             "--control-end": args.control_end}
    if not args.control_image:
        stray = next((flag for flag, value in flags.items() if value), None)
        if stray:
            raise CliError(f"{stray} is only used with --control-image")
        return
    if args.init_image:
        raise CliError("--control-image with --init-image (ControlNet img2img) is not supported; pass one of them")
    for path in args.control_image:
        if not Path(path).expanduser().is_file():
            raise CliError(f"control image not found: {path}")
    try:
        names = controlnet_names(load_manifest(args.directory, verify=False, files=False))
    except ManifestError:
        return  # reported with its remedy when the export loads
    if not names:
        raise CliError(f"{args.directory} has no ControlNet, which --control-image needs; {REMEDY}")
    try:
        check_numbers(SimpleNamespace(**control_kwargs(args)), len(names))
    except GenerationError as exc:
        raise CliError(str(exc).replace("controlnet_conditioning_scale", "--control-scale")
                       .replace("control_guidance_start", "--control-start")
                       .replace("control_guidance_end", "--control-end")
                       .replace("control image(s)", "--control-image(s)")) from None


class ControlNets:
    """The residual inputs of one generation's UNet calls."""

    def __init__(self, pipe, plan: ControlPlan | None) -> None:
        self.pipe = pipe
        self.plan = plan
        unet = pipe.runners.get(UNET.name)
        self.residual_specs = residual_inputs(unet.spec) if unet is not None else []
        self.runners = [pipe.runner(name) for name in plan.names] if plan else []
        self._zeros: dict[tuple[int, ...], dict[str, np.ndarray]] = {}

    def unet_inputs(self, sample: np.ndarray, t, constants: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Residuals for one UNet call on ``sample`` with the call's text ``constants``."""
        if not self.residual_specs:
            return {}
        scales = self.plan.step_scales() if self.plan else []
        total: dict[str, np.ndarray] | None = None
        for index, (runner, scale) in enumerate(zip(self.runners, scales)):
            if scale == 0.0:
                continue  # diffusers runs it and multiplies by 0: same residuals, none of the cost
            feed = {**constants, ControlNetIO.sample: sample,
                    ControlNetIO.timestep: np.full(sample.shape[0], t, dtype=np.float32),
                    ControlNetIO.controlnet_cond: self.plan.image(index, sample.shape[0]),
                    ControlNetIO.conditioning_scale: np.array([scale], dtype=np.float32)}
            out = runner.run(feed)
            total = out if total is None else {k: total[k] + out[k] for k in total}
        return total if total is not None else self.zeros(sample.shape)

    def zeros(self, shape: Sequence[int]) -> dict[str, np.ndarray]:
        """Zero residuals for a UNet call on a sample of ``shape`` (made once per shape)."""
        key = tuple(shape)
        if key not in self._zeros:
            sizes = {Axis.BATCH: shape[0], Axis.HEIGHT: shape[2], Axis.WIDTH: shape[3]}
            made = {}
            for spec in self.residual_specs:
                dims = []
                for d in spec.shape:
                    if isinstance(d, int):
                        dims.append(d)
                        continue
                    resolved = Axis.resolve(d)
                    dims.append(sizes[d] if resolved is None else sizes[resolved[0]] // resolved[1])
                made[spec.name] = np.zeros(dims, dtype=spec.dtype)
            self._zeros[key] = made
        return self._zeros[key]

