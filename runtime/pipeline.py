"""Text-to-image and image-to-image generation from an export directory, without PyTorch.

The loop follows diffusers' StableDiffusion(XL)Pipeline step for step, so that with the same
initial latents, or the same seed through the torch-compatible generator, it reproduces
diffusers' images. Every request is validated before any model runs.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import vae
from .backends.base import ModelRunner, ShapeError
from .backends.select import load_backend
from .guidance import combine_guidance
from .images import load_image, to_pil, to_unit_range
from .manifest import Manifest, ManifestError, load_manifest
from .prompts import TextStack, sdxl_time_ids
from .rng import TorchCompatibleGenerator
from .schedulers import default_scheduler_name, make_scheduler
from .text import ClipTokenizer

CFG_MODES = ("batched", "sequential")
DEFERRED = ("vae_encoder",)
"""Components loaded on first use: text-to-image never needs the VAE encoder."""


class GenerationError(ValueError):
    """A request that cannot be run: the message says what to change."""


@dataclass
class PipelineOutput:
    images: list[Any] | np.ndarray
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds: encode, denoise (all steps), unet_per_step, decode, total."""


@dataclass
class Request:
    """A validated generation request, with every size resolved."""

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
    strength: float | None
    init_image: np.ndarray | None
    latents: np.ndarray | None

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0


class Pipeline:
    """An export directory loaded once; calls are thread-safe and share the loaded models."""

    def __init__(self, directory: Path, manifest: Manifest, runners: dict[str, ModelRunner],
                 tokenizers: list[ClipTokenizer], scheduler_config: dict[str, Any], backend: str,
                 deferred: dict[str, Callable[[], ModelRunner]] | None = None) -> None:
        self.directory = directory
        self.manifest = manifest
        self.runners = runners
        self.backend = backend
        self._deferred = dict(deferred or {})
        self._load_lock = threading.Lock()
        self.scheduler_config = scheduler_config
        self.xl = manifest.pipeline["kind"] == "sdxl"
        self.text = TextStack(tokenizers, [runners[n] for n in manifest.pipeline["text_encoders"]], self.xl)
        facts = manifest.pipeline
        self.vae_factor = int(facts["vae_scale_factor"])
        self.latent_tile = max(int(facts["default_size"]) // self.vae_factor, manifest.latent_multiple)

    @classmethod
    def from_export(cls, directory: str | Path, backend: str = "auto", providers: list[str] | None = None,
                    verify: bool = True, intra_op_threads: int = 0) -> Pipeline:
        """Load every component once. ``backend``: auto (TensorRT engines when present and
        importable, else ONNX Runtime with the best provider), onnxruntime, or tensorrt."""
        import json

        directory = Path(directory)
        manifest = load_manifest(directory, verify=verify)
        required = [*manifest.pipeline["text_encoders"], "unet", "vae_decoder"]
        missing = [name for name in required if name not in manifest.components]
        if missing:
            raise ManifestError(f"{directory} lacks {', '.join(missing)}; re-export without --components "
                                f"to generate images")
        chosen = load_backend(backend, directory, providers=providers, intra_op_threads=intra_op_threads)
        runners = {name: chosen.load(directory, name, spec) for name, spec in manifest.components.items()
                   if name not in DEFERRED}
        deferred = {name: (lambda n=name, s=spec: chosen.load(directory, n, s))
                    for name, spec in manifest.components.items() if name in DEFERRED}
        tokenizers = [ClipTokenizer(directory / name.replace("text_encoder", "tokenizer"))
                      for name in manifest.pipeline["text_encoders"]]
        scheduler_config = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
        return cls(directory, manifest, runners, tokenizers, scheduler_config, chosen.name, deferred)

    def runner(self, name: str) -> ModelRunner:
        """The loaded component, loading a deferred one on first use (once, thread-safe)."""
        if name not in self.runners:
            with self._load_lock:
                if name not in self.runners:
                    self.runners[name] = self._deferred.pop(name)()
        return self.runners[name]

    @property
    def default_size(self) -> int:
        return int(self.manifest.pipeline["default_size"])

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float | None = None, seed: int | None = None, scheduler: str | None = None,
                 num_images_per_prompt: int = 1, latents: np.ndarray | None = None, image: Any = None,
                 strength: float | None = None, output_type: str = "pil", guidance_rescale: float = 0.0,
                 cfg_mode: str = "batched", tile_vae: bool | None = None,
                 callback: Callable[[int, int], None] | None = None) -> PipelineOutput:
        """Generate images; the argument names follow diffusers' pipelines."""
        start = time.perf_counter()
        request = self.validate(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                                scheduler, num_images_per_prompt, latents, image, strength, output_type,
                                guidance_rescale, cfg_mode)
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else int(seed)
        generator = TorchCompatibleGenerator(seed)
        timings: dict[str, float] = {}
        tiling = self.tiling(request.height // self.vae_factor, request.width // self.vae_factor, tile_vae)

        t0 = time.perf_counter()
        embeddings = self.text.encode_pair(
            request.prompts, request.negative, bool(self.manifest.pipeline.get("force_zeros_for_empty_prompt")))
        negative, positive = (self._repeat(e, request.images_per_prompt) for e in embeddings)
        conditioning = self._guidance_inputs(negative, positive, request)
        timings["encode"] = time.perf_counter() - t0

        sched = make_scheduler(request.scheduler, self.scheduler_config)
        sched.set_timesteps(request.steps)
        timesteps = sched.timesteps
        t0 = time.perf_counter()
        if request.init_image is not None:
            timesteps, latents = self._img2img_latents(request, sched, generator, tiling)
        else:
            sched.set_begin_index(0)  # as diffusers' SD-XL does; safe with repeated Karras timesteps
            shape = self._latent_shape(request)
            noise = request.latents if request.latents is not None else generator.randn(shape)
            latents = noise.astype(np.float32) * np.float32(sched.init_noise_sigma)
        timings["encode"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        unet_time = 0.0
        for i, t in enumerate(timesteps):
            model_input = sched.scale_model_input(latents, t)
            u0 = time.perf_counter()
            noise_pred = self._predict_noise(model_input, t, conditioning, request)
            unet_time += time.perf_counter() - u0
            step_noise = generator.randn(latents.shape) if sched.step_needs_noise(t) else None
            latents = sched.step(noise_pred, t, latents, noise=step_noise).astype(np.float32)
            if callback is not None:
                callback(i + 1, len(timesteps))
        timings["denoise"] = time.perf_counter() - t0
        timings["unet_per_step"] = unet_time / max(len(timesteps), 1)

        t0 = time.perf_counter()
        images = vae.decode(self.runners["vae_decoder"], self._unscale(latents), self.vae_factor, tiling)
        images = to_unit_range(images)
        timings["decode"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - start
        return PipelineOutput(images if output_type == "np" else to_pil(images), seed, timings)

    def validate(self, prompt, negative_prompt, height, width, steps, guidance_scale, scheduler,
                 images_per_prompt, latents, image, strength, output_type, guidance_rescale,
                 cfg_mode) -> Request:
        """Check everything a request can get wrong, before any model runs."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise GenerationError("no prompt given")
        negative = None
        if negative_prompt is not None:
            negative = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negative) != len(prompts):
                raise GenerationError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        if int(steps) < 1:
            raise GenerationError(f"num_inference_steps must be at least 1, got {steps}")
        if images_per_prompt < 1:
            raise GenerationError(f"num_images_per_prompt must be at least 1, got {images_per_prompt}")
        if output_type not in ("pil", "np"):
            raise GenerationError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        if cfg_mode not in CFG_MODES:
            raise GenerationError(f"cfg_mode must be one of {', '.join(CFG_MODES)}, got {cfg_mode!r}")
        name = scheduler or default_scheduler_name(self.scheduler_config)
        try:
            make_scheduler(name, self.scheduler_config)
        except ValueError as exc:
            raise GenerationError(str(exc)) from exc
        if image is None and strength is not None:
            raise GenerationError("strength is only used with an init image")
        if image is not None:
            if "vae_encoder" not in self.manifest.components:
                raise GenerationError("this export has no vae_encoder, which img2img needs")
            strength = 0.8 if strength is None else float(strength)
            if not 0.0 < strength <= 1.0:
                raise GenerationError(f"strength must be in (0, 1], got {strength}")
            if latents is not None:
                raise GenerationError("pass either latents or an init image, not both")
            try:
                init = load_image(image, width, height, self.manifest.pixel_multiple)
            except ValueError as exc:
                raise GenerationError(str(exc)) from exc
            height, width = init.shape[2:]
        else:
            init = None
        height = int(height or self.default_size)
        width = int(width or self.default_size)
        multiple = self.manifest.pixel_multiple
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise GenerationError(f"height and width must be positive multiples of {multiple} "
                                  f"(latent multiple {self.manifest.latent_multiple} x VAE factor "
                                  f"{self.vae_factor}); got {width}x{height}")
        request = Request(prompts, negative, height, width, int(steps),
                          float(guidance_scale if guidance_scale is not None else (5.0 if self.xl else 7.5)),
                          float(guidance_rescale), name, images_per_prompt, cfg_mode, strength, init, None)
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != self._latent_shape(request):
                raise GenerationError(f"latents have shape {latents.shape}; {width}x{height} with batch "
                                      f"{request.batch} needs {self._latent_shape(request)}")
            request.latents = latents
        self._check_engine_shapes(request)
        return request

    def _check_engine_shapes(self, request: Request) -> None:
        unet_batch = request.batch * (2 if request.cfg and request.cfg_mode == "batched" else 1)
        lat = self._latent_shape(request)
        try:
            self.runners["unet"].check_shapes({"sample": (unet_batch, *lat[1:])})
            tiled = self.tiling(lat[2], lat[3], None)
            dec = lat if tiled is None else (request.batch, lat[1], min(tiled.tile, lat[2]), min(tiled.tile, lat[3]))
            self.runners["vae_decoder"].check_shapes({"latent_sample": dec})
        except ShapeError as exc:
            raise GenerationError(str(exc)) from exc

    def tiling(self, latent_h: int, latent_w: int, tile_vae: bool | None) -> vae.Tiling | None:
        """Tiles when asked, or automatically beyond twice the model's native size per side."""
        tile = self.latent_tile
        if tile_vae is None:
            tile_vae = latent_h * latent_w > (2 * tile) ** 2
        return vae.Tiling(tile, tile // 4) if tile_vae else None

    def _latent_shape(self, request: Request) -> tuple[int, int, int, int]:
        channels = int(self.manifest.pipeline["latent_channels"])
        return (request.batch, channels, request.height // self.vae_factor, request.width // self.vae_factor)

    @staticmethod
    def _repeat(embeddings, times: int):
        """Each prompt's row repeated ``times`` consecutively, like diffusers' repeat + view."""
        embeddings.hidden = np.repeat(embeddings.hidden, times, axis=0)
        if embeddings.pooled is not None:
            embeddings.pooled = np.repeat(embeddings.pooled, times, axis=0)
        return embeddings

    def _conditioning(self, embeddings, request: Request) -> dict[str, np.ndarray]:
        """The UNet's per-call inputs besides sample and timestep, built once per generation."""
        cond = {"encoder_hidden_states": embeddings.hidden}
        if self.xl:
            cond["text_embeds"] = embeddings.pooled
            cond["time_ids"] = sdxl_time_ids(request.height, request.width, embeddings.hidden.shape[0])
        return cond

    def _guidance_inputs(self, negative, positive, request: Request) -> list[dict[str, np.ndarray]]:
        """One conditioning dict per UNet call of a step: [positive] without CFG, [negative+positive]
        batched, or [negative, positive] sequentially."""
        if not request.cfg:
            return [self._conditioning(positive, request)]
        if request.cfg_mode == "sequential":
            return [self._conditioning(negative, request), self._conditioning(positive, request)]
        both = type(positive)(np.concatenate([negative.hidden, positive.hidden]),
                              None if positive.pooled is None else np.concatenate([negative.pooled, positive.pooled]))
        return [self._conditioning(both, request)]

    def _predict_noise(self, model_input: np.ndarray, t, conditioning: list[dict[str, np.ndarray]],
                       request: Request) -> np.ndarray:
        unet = self.runners["unet"]
        outputs = []
        for cond in conditioning:
            batch = cond["encoder_hidden_states"].shape[0]
            sample = model_input if batch == model_input.shape[0] else np.concatenate([model_input] * 2)
            inputs = {"sample": sample, "timestep": np.full(batch, t, dtype=np.float32), **cond}
            outputs.append(unet.run(inputs, ["out_sample"])["out_sample"].astype(np.float32))
        if not request.cfg:
            return outputs[0]
        uncond, cond = outputs if len(outputs) == 2 else np.split(outputs[0], 2)
        return combine_guidance(uncond, cond, request.guidance_scale, request.guidance_rescale)

    def _unscale(self, latents: np.ndarray) -> np.ndarray:
        facts = self.manifest.pipeline
        shift = facts.get("vae_shift_factor") or 0.0
        return latents / np.float32(facts["vae_scaling_factor"]) + np.float32(shift)

    def _img2img_latents(self, request: Request, sched, generator, tiling) -> tuple[np.ndarray, np.ndarray]:
        """SDEdit as diffusers does it: encode, sample, scale, then noise to the start timestep."""
        init_steps = min(int(request.steps * request.strength), request.steps)
        t_start = max(request.steps - init_steps, 0)
        timesteps = sched.timesteps[t_start * sched.order:]
        if len(timesteps) == 0:
            raise GenerationError(f"strength {request.strength} with {request.steps} steps leaves no step to run")
        sched.set_begin_index(t_start * sched.order)
        encoder_tiling = tiling and vae.Tiling(tiling.tile, tiling.overlap)
        parameters = vae.encode(self.runner("vae_encoder"), request.init_image, self.vae_factor, encoder_tiling)
        mean_shape = (parameters.shape[0], parameters.shape[1] // 2, *parameters.shape[2:])
        latents = vae.sample_latents(parameters, generator.randn(mean_shape))
        shift = self.manifest.pipeline.get("vae_shift_factor") or 0.0
        latents = (latents - np.float32(shift)) * np.float32(self.manifest.pipeline["vae_scaling_factor"])
        if request.batch % latents.shape[0] == 0 and request.batch > latents.shape[0]:
            latents = np.concatenate([latents] * (request.batch // latents.shape[0]))
        noise = generator.randn(latents.shape)
        start = np.repeat(np.asarray(timesteps[:1]), request.batch)
        return timesteps, sched.add_noise(latents, noise, start).astype(np.float32)
