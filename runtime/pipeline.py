"""Text-to-image and image-to-image generation from an export directory, without PyTorch.

The loop follows diffusers' StableDiffusion(XL)Pipeline step for step, so that with the same
initial latents, or the same seed through the torch-compatible generator, it reproduces
diffusers' images. Every request is checked (``request``) before any model runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import admission, controlnet, inpaint, lora, memory, model_cache, vae
from .backends.base import BoundRunner, ModelRunner
from .backends.select import load_backend
from .contract import UNET, VAE_DECODER, VAE_ENCODER, UNetIO, component_kind
from .guidance import combine_guidance
from .hires import Hires, resolve_hires, run_chain, stage_callback
from .images import to_pil, to_unit_range
from .manifest import Manifest, ManifestError
from .prompts import TextStack, sdxl_time_ids
from .request import GenerationError, GenerationRequest, Plan
from .rng import TorchCompatibleGenerator
from .schedulers import make_scheduler
from .text import ClipTokenizer

__all__ = ["GenerationError", "GenerationRequest", "Pipeline", "PipelineOutput", "Plan"]


@dataclass
class PipelineOutput:
    images: list[Any] | np.ndarray
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds: encode, denoise (all steps), unet_per_step, decode, total."""
    scheduler: str = ""
    """The scheduler that ran (registry name)."""


class Pipeline:
    """An export directory loaded once; calls are thread-safe and share the loaded models."""

    cache: model_cache.ModelCache | None = None
    """ONNX Runtime's cache of optimised models, when in use (``from_export``'s ``cache_dir``)."""
    runners = lora.Pinned()  # a generation keeps the UNet and text encoders it started with (set_loras)
    text = lora.Pinned()
    loras: tuple = ()
    """What ``set_loras`` / ``from_export(loras=...)`` applied, per file."""

    def __init__(self, directory: Path, manifest: Manifest, runners: dict[str, ModelRunner],
                 tokenizers: list[ClipTokenizer], scheduler_config: dict[str, Any], backend: str,
                 deferred: dict[str, Callable[[], ModelRunner]] | None = None,
                 memory_limit: int | str | None = None) -> None:
        self.directory = directory
        self.manifest = manifest
        self.runners = runners
        self.backend = backend
        self._deferred = dict(deferred or {})
        self._load_lock = threading.Lock()
        self.scheduler_config = scheduler_config
        self.facts = manifest.pipeline
        self.xl = self.facts.xl
        self.text = TextStack(tokenizers, [runners[n] for n in self.facts.text_encoders], self.xl)
        self.vae_factor = self.facts.vae_scale_factor
        self.latent_tile = self.facts.native_latent_side
        self.memory_limit = None if memory_limit is None else memory.parse_memory(memory_limit)
        self.footprint = memory.Footprint.from_export(directory, manifest)
        self.unet_extra_channels = inpaint.unet_extra_channels(manifest)
        """0, or the mask and masked-image channels of an inpainting UNet (``runtime.inpaint``)."""
        self.no_control = controlnet.ControlNets(self, None)
        """Zero residuals for a ControlNet export's UNet when no control image is given."""

    @classmethod
    def from_export(cls, directory: str | Path, backend: str = "auto", providers: list[str] | None = None,
                    verify: bool = True, intra_op_threads: int = 0, provider_options: dict | None = None,
                    io_binding: bool = True, memory_limit: int | str | None = None,
                    cache_dir: str | Path | bool | None = None, loras: list | None = None,
                    session_options: dict | None = None) -> Pipeline:
        """Load every component once. ``backend``: auto (TensorRT engines when present and
        importable, else ONNX Runtime with the best provider), onnxruntime, or tensorrt.
        ONNX Runtime: ``provider_options`` per provider name (e.g. ``{"CUDAExecutionProvider":
        {"device_id": 1}}``), ``io_binding`` for the denoising loop (see backends/onnxruntime.py).
        ``memory_limit``: bytes (or "12G") a generation may use in all; default: what is available
        when it starts. Requests estimated above it are refused before any model runs.
        ``cache_dir``: where ONNX Runtime's optimised models are cached (``runtime.model_cache``;
        default ``$LINFUSION_CACHE`` or ``~/.cache/linfusion/ort``; False turns it off).
        ``loras``: ``[(path, scale), ...]`` or ``"PATH[:SCALE]"`` strings, added to the weights
        (``set_loras``). ``session_options``: ONNX Runtime session settings over the runtime's
        (``backends.onnxruntime.SESSION_DEFAULTS``; e.g. ``{"shared_arena": False}``)."""
        import json

        directory = Path(directory)
        manifest = model_cache.load_manifest(directory, verify, cache_dir)
        required = [*manifest.pipeline.text_encoders, UNET.name, VAE_DECODER.name]
        missing = [name for name in required if name not in manifest.components]
        if missing:
            raise ManifestError(f"{directory} lacks {', '.join(missing)}; re-export without --components "
                                f"to generate images")
        update = lora.prepare(directory, manifest, loras) if loras else None  # checked before any model loads
        chosen = load_backend(backend, directory, providers=providers, intra_op_threads=intra_op_threads,
                              provider_options=provider_options, io_binding=io_binding,
                              session_options=session_options)
        cache = model_cache.attach(chosen, directory, manifest, cache_dir, verify)
        specs = manifest.components
        runners = {name: chosen.load(directory, name, spec) for name, spec in specs.items()
                   if not component_kind(spec.kind).deferred}
        deferred = {name: (lambda n=name, s=spec: chosen.load(directory, n, s))
                    for name, spec in specs.items() if component_kind(spec.kind).deferred}
        tokenizers = [ClipTokenizer(directory / component_kind(specs[name].kind).tokenizer)
                      for name in manifest.pipeline.text_encoders]
        try:
            scheduler_config = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{directory}: cannot read scheduler/scheduler_config.json ({exc}); "
                                f"re-export the model") from exc
        pipe = cls(directory, manifest, runners, tokenizers, scheduler_config, chosen.name, deferred, memory_limit)
        pipe.cache = cache
        if chosen.shares_cpu_arena():
            pipe.footprint = replace(pipe.footprint, shared_arena=True)
        if update is not None:
            lora.install(pipe, update)
        return pipe

    def set_loras(self, loras: list) -> list[dict]:
        """Replace the LoRAs (``[(path, scale), ...]``; ``[]`` removes them) on the live pipeline: requests
        in flight finish with the weights they started with. Raises LoraError before changing anything."""
        return lora.set_loras(self, loras)

    def runner(self, name: str) -> ModelRunner:
        """The loaded component, loading a deferred one on first use (once, thread-safe)."""
        if name not in self.runners:
            with self._load_lock:
                if name not in self.runners:
                    self.runners[name] = self._deferred.pop(name)()
        return self.runners[name]

    @property
    def default_size(self) -> int:
        return self.facts.default_size

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float | None = None, seed: int | None = None, scheduler: str | None = None,
                 num_images_per_prompt: int = 1, latents: np.ndarray | None = None, image: Any = None,
                 strength: float | None = None, output_type: str = "pil", guidance_rescale: float = 0.0,
                 cfg_mode: str = "batched", tile_vae: bool | int | None = None,
                 memory_limit: int | str | None = None, hires: Hires | str | None = None,
                 callback: Callable[..., None] | None = None, mask_image: Any = None, control_image: Any = None,
                 controlnet_conditioning_scale: float | Sequence[float] | None = None,
                 control_guidance_start: float | Sequence[float] | None = None,
                 control_guidance_end: float | Sequence[float] | None = None) -> PipelineOutput:
        """Generate images; the argument names follow diffusers' pipelines (see ``GenerationRequest``).
        ``hires``: "auto" (or a ``runtime.hires.Hires``) reaches a large size through the staged
        SDEdit chain; None or "off": one pass at the requested size, as diffusers' pipelines do.
        ``control_image`` and the ``control*`` arguments: ControlNet exports (``runtime.controlnet``)."""
        request = GenerationRequest(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, seed, scheduler,
            num_images_per_prompt, latents, image, strength, output_type, guidance_rescale, cfg_mode, tile_vae,
            memory_limit, hires, mask_image=mask_image, control_image=control_image,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end)
        return self.generate(request, callback)

    @lora.pinned
    def generate(self, request: GenerationRequest, callback: Callable[..., None] | None = None,
                 generator: TorchCompatibleGenerator | None = None) -> PipelineOutput:
        """Run one request: checked first (``plan``), then encode, denoise, decode. A request with
        ``hires`` runs the staged chain (``runtime.hires``), which calls back here once per stage
        with its own ``generator``: draw from it instead of a fresh one seeded with the plan's seed."""
        chain = resolve_hires(request)
        if chain is not None:
            return run_chain(self, replace(request, hires=None), chain, callback)
        callback = stage_callback(callback, 0)  # a (stage, step, total) callback works here too
        start = time.perf_counter()
        plan = self.plan(request)
        generator = TorchCompatibleGenerator(plan.seed) if generator is None else generator
        timings: dict[str, float] = {}
        tiling = self.tiling(plan.height // self.vae_factor, plan.width // self.vae_factor, plan.tile_vae)

        t0 = time.perf_counter()
        embeddings = self.text.encode_pair(plan.prompts, plan.negative, self.facts.force_zeros_for_empty_prompt)
        negative, positive = (self._repeat(e, plan.images_per_prompt) for e in embeddings)
        conditioning = [self.runners[UNET.name].bind(c) for c in self._guidance_inputs(negative, positive, plan)]
        timings["encode"] = time.perf_counter() - t0

        sched = make_scheduler(plan.scheduler, self.scheduler_config)
        sched.set_timesteps(plan.steps)
        timesteps = sched.timesteps
        t0 = time.perf_counter()
        inpainting = None
        if plan.mask is not None:
            timesteps, latents, inpainting = inpaint.prepare(self, plan, sched, generator, tiling)
        elif plan.init_image is not None:
            timesteps, latents = self._img2img_latents(plan, sched, generator, tiling)
        else:
            sched.set_begin_index(0)  # as diffusers' SD-XL does; safe with repeated Karras timesteps
            noise = plan.latents if plan.latents is not None else generator.randn(self._latent_shape(plan))
            latents = noise.astype(np.float32) * np.float32(sched.init_noise_sigma)
        timings["encode"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        unet_time = 0.0
        controls = controlnet.ControlNets(self, plan.control) if plan.control else None
        for i, t in enumerate(timesteps):
            model_input = sched.scale_model_input(latents, t)
            if inpainting is not None:
                model_input = inpainting.unet_input(model_input)
            u0 = time.perf_counter()
            if controls:
                plan.control.step, plan.control.steps = i, len(timesteps)
            noise_pred = self._predict_noise(model_input, t, conditioning, plan, controls)
            unet_time += time.perf_counter() - u0
            step_noise = generator.randn(latents.shape) if sched.step_needs_noise(t) else None
            latents = sched.step(noise_pred, t, latents, noise=step_noise).astype(np.float32)
            if inpainting is not None:
                latents = inpainting.blend(latents, i, timesteps, sched)
            if callback is not None:
                callback(i + 1, len(timesteps))
        timings["denoise"] = time.perf_counter() - t0
        timings["unet_per_step"] = unet_time / max(len(timesteps), 1)

        t0 = time.perf_counter()
        images = vae.decode(self.runners[VAE_DECODER.name], self._unscale(latents), self.vae_factor, tiling)
        images = to_unit_range(images)
        timings["decode"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - start
        return PipelineOutput(images if plan.output_type == "np" else to_pil(images), plan.seed, timings,
                              plan.scheduler)

    def plan(self, request: GenerationRequest) -> Plan:
        """Check everything a request can get wrong, before any model runs (``runtime.admission``)."""
        return admission.plan_request(self, request)

    def _estimate(self, plan: Plan, cfg_mode: str) -> memory.Estimate:
        return admission.estimate(self, plan, cfg_mode)

    def tiling(self, latent_h: int, latent_w: int, tile_vae: bool | int | None) -> vae.Tiling | None:
        """Tiles when asked (True: the largest tile the VAE budget allows; an int: tile edge in
        image pixels), or automatically beyond twice the model's native size per side."""
        decoder = self.runners[VAE_DECODER.name]
        channels = (self.facts.vae_block_channels or (128,))[0]
        try:
            return vae.choose_tiling(latent_h, latent_w, tile_vae, self.latent_tile, self.vae_factor, channels,
                                     decoder.input_dtype(decoder.input_names[0]).itemsize)
        except ValueError as exc:
            raise GenerationError(f"tile_vae: {exc}") from exc

    def _latent_shape(self, plan: Plan) -> tuple[int, int, int, int]:
        return (plan.batch, self.facts.latent_channels, plan.height // self.vae_factor, plan.width // self.vae_factor)

    @staticmethod
    def _repeat(embeddings, times: int):
        """Each prompt's row repeated ``times`` consecutively, like diffusers' repeat + view."""
        embeddings.hidden = np.repeat(embeddings.hidden, times, axis=0)
        if embeddings.pooled is not None:
            embeddings.pooled = np.repeat(embeddings.pooled, times, axis=0)
        return embeddings

    def _conditioning(self, embeddings, plan: Plan) -> dict[str, np.ndarray]:
        """The UNet's per-call inputs besides sample and timestep, built once per generation."""
        cond = {UNetIO.encoder_hidden_states: embeddings.hidden}
        if self.xl:
            cond[UNetIO.text_embeds] = embeddings.pooled
            cond[UNetIO.time_ids] = sdxl_time_ids(plan.height, plan.width, embeddings.hidden.shape[0])
        return cond

    def _guidance_inputs(self, negative, positive, request: Plan) -> list[dict[str, np.ndarray]]:
        """One conditioning dict per UNet call of a step: [positive] without CFG, [negative+positive]
        batched, or [negative, positive] sequentially."""
        if not request.cfg:
            return [self._conditioning(positive, request)]
        if request.cfg_mode == "sequential":
            return [self._conditioning(negative, request), self._conditioning(positive, request)]
        both = type(positive)(np.concatenate([negative.hidden, positive.hidden]),
                              None if positive.pooled is None else np.concatenate([negative.pooled, positive.pooled]))
        return [self._conditioning(both, request)]

    def _predict_noise(self, model_input: np.ndarray, t, conditioning: list[dict[str, np.ndarray] | BoundRunner],
                       request: Plan, controls: controlnet.ControlNets | None = None) -> np.ndarray:
        """One step's noise prediction; ``conditioning`` as ``_guidance_inputs`` makes it, or bound to
        the UNet (``_bind``) so that a device backend keeps it on the device across steps."""
        unet = self.runners[UNET.name]
        outputs = []
        for cond in conditioning:
            bound = cond if isinstance(cond, BoundRunner) else unet.bind(cond)
            batch = bound.batch(UNetIO.encoder_hidden_states)
            sample = model_input if batch == model_input.shape[0] else np.concatenate([model_input] * 2)
            inputs = {UNetIO.sample: sample, UNetIO.timestep: np.full(batch, t, dtype=np.float32)}
            inputs.update((controls or self.no_control).unet_inputs(sample, t, bound.constants))
            out_shape = (batch, unet.spec.outputs[0].shape[1], *sample.shape[2:])
            out = bound.run(inputs, [UNetIO.out_sample], output_shapes={UNetIO.out_sample: out_shape})
            outputs.append(out[UNetIO.out_sample].astype(np.float32))
        if not request.cfg:
            return outputs[0]
        uncond, cond = outputs if len(outputs) == 2 else np.split(outputs[0], 2)
        return combine_guidance(uncond, cond, request.guidance_scale, request.guidance_rescale)

    def _unscale(self, latents: np.ndarray) -> np.ndarray:
        shift = self.facts.vae_shift_factor or 0.0
        return latents / np.float32(self.facts.vae_scaling_factor) + np.float32(shift)

    def _start_timesteps(self, request: Plan, sched):
        """The schedule's tail that ``strength`` leaves, as diffusers' get_timesteps cuts it."""
        init_steps = min(int(request.steps * request.strength), request.steps)
        t_start = max(request.steps - init_steps, 0)
        timesteps = sched.timesteps[t_start * sched.order:]
        if len(timesteps) == 0:
            raise GenerationError(f"strength {request.strength} with {request.steps} steps leaves no step to run")
        sched.set_begin_index(t_start * sched.order)
        return timesteps

    def _encode_latents(self, images: np.ndarray, generator, tiling) -> np.ndarray:
        """Images in [-1, 1] -> scaled latents, sampled from the VAE's distribution with ``generator``."""
        parameters = vae.encode(self.runner(VAE_ENCODER.name), images, self.vae_factor, tiling)
        mean_shape = (parameters.shape[0], parameters.shape[1] // 2, *parameters.shape[2:])
        latents = vae.sample_latents(parameters, generator.randn(mean_shape))
        shift = self.facts.vae_shift_factor or 0.0
        return (latents - np.float32(shift)) * np.float32(self.facts.vae_scaling_factor)

    def _img2img_latents(self, request: Plan, sched, generator, tiling) -> tuple[np.ndarray, np.ndarray]:
        """SDEdit as diffusers does it: encode, sample, scale, then noise to the start timestep."""
        timesteps = self._start_timesteps(request, sched)
        latents = self._encode_latents(request.init_image, generator, tiling)
        if request.batch % latents.shape[0] == 0 and request.batch > latents.shape[0]:
            latents = np.concatenate([latents] * (request.batch // latents.shape[0]))
        noise = generator.randn(latents.shape)
        start = np.repeat(np.asarray(timesteps[:1]), request.batch)
        return timesteps, sched.add_noise(latents, noise, start).astype(np.float32)
