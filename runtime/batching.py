"""Several generation requests run as one batch: one text-encoder call, one UNet call per step.

A service coalesces requests that share everything but their prompts, seeds and init images
(``batch_key``) and runs them with ``generate_batch``. Each request keeps its own prompts, its own
``TorchCompatibleGenerator`` (initial noise, img2img's VAE sample and noise, and the per-step noise
of stochastic samplers are drawn from it in the order ``Pipeline.generate`` draws them), so its
images equal the ones ``Pipeline.generate`` makes for it alone, up to the floating-point
differences of a larger batch in the backend's kernels. This works because every scheduler step is
elementwise per sample and classifier-free guidance is per sample.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from . import vae
from .backends.base import ShapeError
from .contract import UNET, VAE_DECODER, UNetIO
from .images import to_pil, to_unit_range
from .pipeline import Pipeline, PipelineOutput
from .prompts import PromptEmbeddings
from .request import GenerationError, GenerationRequest, Plan
from .rng import TorchCompatibleGenerator
from .schedulers import make_scheduler

__all__ = ["batch_key", "compatible", "generate_batch"]


def batch_key(pipe: Pipeline, plan: Plan) -> tuple[Any, ...]:
    """What requests must share to run in one batch: mode, size, steps, scheduler, guidance, tiling.

    Prompts, negative prompts, seeds, init images, latents, images per prompt and output type may differ.
    """
    tiling = pipe.tiling(plan.height // pipe.vae_factor, plan.width // pipe.vae_factor, plan.tile_vae)
    mode = "txt2img" if plan.init_image is None else "img2img"
    return (mode, plan.height, plan.width, plan.steps, plan.scheduler, plan.guidance_scale,
            plan.guidance_rescale, plan.cfg_mode if plan.cfg else None, plan.strength,
            None if tiling is None else (tiling.tile, tiling.overlap))


KEY_NAMES = ("mode", "height", "width", "steps", "scheduler", "guidance_scale", "guidance_rescale", "cfg_mode",
             "strength", "VAE tiling")


def compatible(pipe: Pipeline, plans: Sequence[Plan]) -> None:
    """Raise GenerationError naming the first setting in which a plan differs from the first one."""
    first = batch_key(pipe, plans[0])
    for index, plan in enumerate(plans[1:], start=1):
        key = batch_key(pipe, plan)
        for name, a, b in zip(KEY_NAMES, first, key):
            if a != b:
                raise GenerationError(f"request {index} cannot join this batch: its {name} is {b!r}, "
                                      f"the batch's is {a!r}; run it separately")


def generate_batch(pipe: Pipeline, requests: Sequence[GenerationRequest],
                   callback: Callable[[int, int], None] | None = None,
                   interrupt: threading.Event | None = None) -> list[PipelineOutput]:
    """Run compatible requests as one batch; one ``PipelineOutput`` per request, in order.

    ``callback(step, total)`` is called after every step. When ``interrupt`` is set the loop stops
    before its next step and the current latents are decoded (as AUTOMATIC1111's interrupt does);
    ``timings["steps_run"]`` then says how many steps ran.
    """
    start = time.perf_counter()
    if not requests:
        return []
    plans = [pipe.plan(request) for request in requests]
    compatible(pipe, plans)
    first = plans[0]
    counts = [plan.batch for plan in plans]
    combined = replace(first, prompts=[p for plan in plans for p in plan.prompts for _ in range(plan.images_per_prompt)],
                       negative=None, images_per_prompt=1, latents=None, init_image=None)
    tiling = pipe.tiling(first.height // pipe.vae_factor, first.width // pipe.vae_factor, first.tile_vae)
    _check_shapes(pipe, combined, tiling)
    generators = [TorchCompatibleGenerator(plan.seed) for plan in plans]
    timings: dict[str, float] = {"batch": float(combined.batch)}

    t0 = time.perf_counter()
    negative, positive = _encode(pipe, plans, first.cfg)
    conditioning = pipe._guidance_inputs(negative, positive, combined)
    timings["encode"] = time.perf_counter() - t0

    sched = make_scheduler(first.scheduler, pipe.scheduler_config)
    sched.set_timesteps(first.steps)
    t0 = time.perf_counter()
    timesteps, latents = _initial_latents(pipe, plans, sched, generators, tiling)
    timings["encode"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    unet_time, steps_run = 0.0, 0
    for i, t in enumerate(timesteps):
        if interrupt is not None and interrupt.is_set():
            break
        model_input = sched.scale_model_input(latents, t)
        u0 = time.perf_counter()
        noise_pred = pipe._predict_noise(model_input, t, conditioning, combined)
        unet_time += time.perf_counter() - u0
        step_noise = None
        if sched.step_needs_noise(t):
            step_noise = np.concatenate([g.randn((n, *latents.shape[1:])) for g, n in zip(generators, counts)])
        latents = sched.step(noise_pred, t, latents, noise=step_noise).astype(np.float32)
        steps_run = i + 1
        if callback is not None:
            callback(i + 1, len(timesteps))
    timings["denoise"] = time.perf_counter() - t0
    timings["unet_per_step"] = unet_time / max(steps_run, 1)
    timings["steps_run"] = float(steps_run)

    t0 = time.perf_counter()
    images = vae.decode(pipe.runners[VAE_DECODER.name], pipe._unscale(latents), pipe.vae_factor, tiling)
    images = to_unit_range(images)
    timings["decode"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    outputs, offset = [], 0
    for plan, count in zip(plans, counts):
        mine = images[offset:offset + count]
        offset += count
        outputs.append(PipelineOutput(mine if plan.output_type == "np" else to_pil(mine), plan.seed, dict(timings),
                                      plan.scheduler))
    return outputs


def _check_shapes(pipe: Pipeline, combined: Plan, tiling: vae.Tiling | None) -> None:
    """The whole batch must fit the loaded engines' shape ranges (TensorRT profiles have a max batch)."""
    lat = pipe._latent_shape(combined)
    dec = lat if tiling is None else (combined.batch, lat[1], min(tiling.tile, lat[2]), min(tiling.tile, lat[3]))
    try:
        pipe.runners[UNET.name].check_shapes({UNetIO.sample: (combined.unet_batch, *lat[1:])})
        decoder = pipe.runners[VAE_DECODER.name]
        decoder.check_shapes({decoder.input_names[0]: dec})
    except ShapeError as exc:
        raise GenerationError(f"a batch of {combined.batch} images does not fit the loaded models: {exc}; "
                              f"lower the batch size") from exc


def _encode(pipe: Pipeline, plans: Sequence[Plan], cfg: bool) -> tuple[PromptEmbeddings, PromptEmbeddings]:
    """(negative, positive) rows for every image of the batch, from one text-encoder call.

    As ``TextStack.encode_pair``: no negative prompt means "" (SD-XL with force_zeros_for_empty_prompt:
    zeros); without classifier-free guidance the negatives are never used, so they are not encoded.
    """
    zeros_if_none = pipe.xl and pipe.facts.force_zeros_for_empty_prompt
    texts = [p for plan in plans for p in plan.prompts]
    negatives: list[list[str] | None] = []
    for plan in plans:
        wanted = cfg and not (plan.negative is None and zeros_if_none)
        negatives.append((plan.negative or [""] * len(plan.prompts)) if wanted else None)
    encoded = pipe.text.encode(texts + [n for rows in negatives if rows for n in rows])
    positives, negative_rows, row = [], [], 0
    for plan in plans:
        positives.append(_rows(encoded, row, len(plan.prompts)))
        row += len(plan.prompts)
    for plan, rows in zip(plans, negatives):
        if rows is None:
            like = positives[len(negative_rows)]
            negative_rows.append(PromptEmbeddings(np.zeros_like(like.hidden),
                                                  None if like.pooled is None else np.zeros_like(like.pooled)))
        else:
            negative_rows.append(_rows(encoded, row, len(rows)))
            row += len(rows)
    return _join(negative_rows, plans), _join(positives, plans)


def _rows(embeddings: PromptEmbeddings, start: int, count: int) -> PromptEmbeddings:
    pooled = None if embeddings.pooled is None else embeddings.pooled[start:start + count]
    return PromptEmbeddings(embeddings.hidden[start:start + count], pooled)


def _join(parts: Sequence[PromptEmbeddings], plans: Sequence[Plan]) -> PromptEmbeddings:
    """Each plan's rows repeated images_per_prompt times (as ``Pipeline._repeat``), then stacked."""
    hidden = np.concatenate([np.repeat(e.hidden, p.images_per_prompt, axis=0) for e, p in zip(parts, plans)])
    if parts[0].pooled is None:
        return PromptEmbeddings(hidden)
    pooled = np.concatenate([np.repeat(e.pooled, p.images_per_prompt, axis=0) for e, p in zip(parts, plans)])
    return PromptEmbeddings(hidden, pooled)


def _initial_latents(pipe: Pipeline, plans: Sequence[Plan], sched, generators, tiling):
    """(timesteps, latents): each plan's start drawn from its own generator, then stacked."""
    if plans[0].init_image is not None:
        parts = [pipe._img2img_latents(plan, sched, g, tiling) for plan, g in zip(plans, generators)]
        return parts[0][0], np.concatenate([latents for _, latents in parts])
    sched.set_begin_index(0)  # as Pipeline.generate does
    noise = [plan.latents if plan.latents is not None else g.randn(pipe._latent_shape(plan))
             for plan, g in zip(plans, generators)]
    latents = np.concatenate(noise).astype(np.float32) * np.float32(sched.init_noise_sigma)
    return sched.timesteps, latents
