"""Admission of a request: every check before any model runs (``Pipeline.plan``).

Numbers, scheduler, init image, mask and control arguments, sizes against the export's multiple
and limits, engine shapes, and the memory guard with its batched-to-sequential guidance fallback.
Turns a ``GenerationRequest`` into a ``Plan`` or raises ``GenerationError`` with one line.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import controlnet, inpaint, limits, memory
from .backends.base import ShapeError
from .contract import UNET, VAE_DECODER, VAE_ENCODER, UNetIO
from .images import load_image
from .request import GenerationError, GenerationRequest, Plan, check_numbers, prompt_lists
from .schedulers import default_scheduler_name, make_scheduler


def plan_request(pipe: Any, request: GenerationRequest) -> Plan:
    """``Pipeline.plan``: check everything a request can get wrong, before any model runs."""
    prompts, negative = prompt_lists(request.prompt, request.negative_prompt)
    numbers = check_numbers(request, pipe.facts.default_guidance_scale)
    name = request.scheduler or default_scheduler_name(pipe.scheduler_config)
    try:
        make_scheduler(name, pipe.scheduler_config).set_timesteps(numbers["steps"])
    except ValueError as exc:
        raise GenerationError(f"scheduler {name}: {exc}" if name not in str(exc) else str(exc)) from exc
    height, width, strength, init, mask = numbers["height"], numbers["width"], numbers["strength"], None, None
    inpaint.check_request(request, pipe.unet_extra_channels)
    if request.image is not None:
        if VAE_ENCODER.name not in pipe.manifest.components:
            raise GenerationError("this export has no vae_encoder, which img2img needs")
        strength = (0.8 if request.mask_image is None else 1.0) if strength is None else strength
        if request.latents is not None and (request.mask_image is None or strength < 1):
            raise GenerationError("pass either latents or an init image, not both (inpainting: latents "
                                  "with strength 1)")
        try:
            init = load_image(request.image, width, height, pipe.manifest.pixel_multiple)
        except ValueError as exc:
            raise GenerationError(str(exc)) from exc
        height, width = init.shape[2:]
        if request.mask_image is not None:
            mask = inpaint.load_mask(request.mask_image, width, height, inpaint.source_size(request.image))
    batch = len(prompts) * numbers["images_per_prompt"]
    control, height, width = controlnet.plan_control(request, pipe.manifest, height, width, batch)
    height = height or pipe.default_size
    width = width or pipe.default_size
    multiple = pipe.manifest.pixel_multiple
    if height % multiple or width % multiple:
        raise GenerationError(f"height and width must be positive multiples of {multiple} "
                              f"(latent multiple {pipe.manifest.latent_multiple} x VAE factor "
                              f"{pipe.vae_factor}); got {width}x{height}")
    limits.check_size(pipe.facts, width, height)
    plan = Plan(prompts, negative, height, width, numbers["steps"], numbers["guidance_scale"],
                numbers["guidance_rescale"], name, numbers["images_per_prompt"], request.cfg_mode,
                numbers["seed"], request.output_type, request.tile_vae, strength, init, mask=mask,
                control=control)
    # Above the export's batch-2 size, batched guidance would put UNet tensors above the limit.
    mode = limits.cfg_mode_for(pipe.facts, width, height, plan.batch, request.cfg_mode)
    plan.cfg_mode = mode if plan.cfg else request.cfg_mode
    if request.latents is not None:
        latents = np.asarray(request.latents, dtype=np.float32)
        if latents.shape != pipe._latent_shape(plan):
            raise GenerationError(f"latents have shape {latents.shape}; {width}x{height} with batch "
                                  f"{plan.batch} needs {pipe._latent_shape(plan)}")
        if not np.isfinite(latents).all():
            raise GenerationError("latents contain NaN or infinite values")
        plan.latents = latents
    check_engine_shapes(pipe, plan)
    check_memory(pipe, plan, request.memory_limit)
    return plan


def check_memory(pipe: Any, plan: Plan, limit: int | str | None) -> None:
    """Refuse a request whose estimated peak does not fit (``runtime.memory``, calibrated in
    docs/memory.md); batched classifier-free guidance falls back to sequential (same images)
    when only that fits."""
    try:
        limit = pipe.memory_limit if limit is None else memory.parse_memory(limit)
    except ValueError as exc:
        raise GenerationError(str(exc)) from exc
    resident = 0
    if limit is None:  # what is free now, plus what this pipeline already holds (its weights)
        limit = memory.available_bytes(pipe.backend)
        resident = estimate(pipe, plan, plan.cfg_mode).weights + (0 if pipe.backend == "tensorrt" else memory.BASE)
    modes = [plan.cfg_mode] + (["sequential"] if plan.cfg and plan.cfg_mode == "batched" else [])
    for mode in modes:
        needed = estimate(pipe, plan, mode)
        if needed.total <= limit + resident:
            plan.cfg_mode, plan.memory = mode, needed
            return
    try:
        memory.check_fits(estimate(pipe, plan, modes[-1]), limit + resident)
    except memory.MemoryGuardError as exc:
        raise GenerationError(str(exc)) from exc


def estimate(pipe: Any, plan: Plan, cfg_mode: str) -> memory.Estimate:
    tiling = pipe.tiling(plan.height // pipe.vae_factor, plan.width // pipe.vae_factor, plan.tile_vae)
    encodes = 1 if plan.mask is None else inpaint.encoder_calls(pipe.unet_extra_channels, plan.strength,
                                                                 plan.latents is not None)
    return memory.estimate(pipe.footprint, height=plan.height, width=plan.width, batch=plan.batch,
                           cfg=cfg_mode if plan.cfg else "none", vae_tile=tiling.tile if tiling else None,
                           img2img=plan.init_image is not None, backend=pipe.backend, steps=plan.steps,
                           vae_tile_batch=tiling.batch if tiling else 1,
                           vae_overlap=tiling.overlap if tiling else None, encodes=encodes,
                           controlnets=tuple(plan.control.names) if plan.control else ())


def check_engine_shapes(pipe: Any, plan: Plan) -> None:
    lat = pipe._latent_shape(plan)
    try:
        unet_channels = lat[1] + pipe.unet_extra_channels
        pipe.runners[UNET.name].check_shapes({UNetIO.sample: (plan.unet_batch, unet_channels, *lat[2:])})
        for name in plan.control.names if plan.control else ():
            pipe.runner(name).check_shapes({UNetIO.sample: (plan.unet_batch, *lat[1:])})
        tiled = pipe.tiling(lat[2], lat[3], plan.tile_vae)
        dec = lat if tiled is None else (plan.batch, lat[1], min(tiled.tile, lat[2]), min(tiled.tile, lat[3]))
        decoder = pipe.runners[VAE_DECODER.name]
        decoder.check_shapes({decoder.input_names[0]: dec})
    except ShapeError as exc:
        raise GenerationError(str(exc)) from exc
