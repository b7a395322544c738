"""One entry point from any model source to a diffusers pipeline with LinFusion mounted.

Sources: a preset (weights from the hub), a preset with seeded random weights, a local
diffusers folder (with a LinFusion folder or a recognised base-model name), or a hub id.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import OFFICIAL_CHECKPOINTS, LinFusion
from .hub import OFFLINE_HINT, ModelSourceError, looks_like_path, resolve_files
from .presets import PRESETS, Preset, build_random_pipeline

logger = logging.getLogger(__name__)


@dataclass
class LoadedPipeline:
    """A pipeline with LinFusion mounted, and where each part came from (for manifests)."""

    pipeline: Any
    linfusion: LinFusion
    model: str
    base_model: str | None
    base_revision: str | None
    linfusion_source: str | None
    linfusion_revision: str | None
    random_weights: bool
    preset: Preset | None = None
    vae_source: str | None = None
    seed: int | None = None
    """The seed of random weights (None for downloaded weights)."""

    @property
    def is_xl(self) -> bool:
        return hasattr(self.pipeline, "text_encoder_2")

    def provenance(self) -> dict[str, Any]:
        return {"model": self.model, "preset": self.preset.name if self.preset else None,
                "base_model": self.base_model, "base_revision": self.base_revision,
                "linfusion": self.linfusion_source, "linfusion_revision": self.linfusion_revision,
                "random_weights": self.random_weights, "seed": self.seed, "vae": self.vae_source}


def load_pipeline(model: str, linfusion: str | None = None, random_weights: bool = False,
                  dtype: Any = None, seed: int = 0, revision: str | None = None,
                  local_files_only: bool = False, vae: str | None = None) -> LoadedPipeline:
    """Load ``model`` and mount LinFusion on its UNet.

    ``linfusion`` overrides the checkpoint (hub id or folder); without it a preset or an
    official base model gets its official checkpoint, and random-weight builds get a seeded
    from-scratch LinFusion. ``vae`` replaces the pipeline's VAE (e.g. a fixed fp16 SD-XL VAE).
    """
    import torch

    dtype = dtype or torch.float32
    preset = PRESETS.get(model)
    if preset is not None and (random_weights or preset.is_tiny):
        pipe = build_random_pipeline(preset, seed, local_files_only=True, dtype=dtype)
        loaded = LoadedPipeline(pipe, None, model, preset.base_model, None, None, None, True, preset, seed=seed)
    elif preset is not None:
        loaded = _from_pretrained(preset.base_model, revision, local_files_only, model, dtype)
        loaded.preset = preset
        linfusion = linfusion or preset.linfusion_checkpoint
    elif random_weights:
        raise ModelSourceError(f"--random-weights needs a preset ({', '.join(PRESETS)}); "
                               f"'{model}' is not one")
    elif Path(model).expanduser().is_dir() or looks_like_path(model) or "/" in model:
        loaded = _from_pretrained(model, revision, local_files_only, model, dtype)
    else:
        raise ModelSourceError(f"unknown model '{model}': not a preset ({', '.join(PRESETS)}), "
                               f"a local folder, or a hub id such as owner/name")

    if vae is not None:
        loaded.pipeline.vae = load_vae(vae, dtype, local_files_only)
        loaded.vae_source = vae
    unet = loaded.pipeline.unet
    if linfusion is None and loaded.random_weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919)
            lf = LinFusion.from_unet(unet, preset.projection_mid_divisor if preset else None)
    else:
        source = linfusion or official_checkpoint_for(model)
        lf = LinFusion.from_pretrained(source, local_files_only=local_files_only)
        loaded.linfusion_source, loaded.linfusion_revision = lf.source, lf.revision
    lf.mount(unet)
    loaded.linfusion = lf
    return loaded


def official_checkpoint_for(model: str) -> str:
    """The official LinFusion checkpoint for a base model id, or a local folder named like one."""
    if model in OFFICIAL_CHECKPOINTS:
        return OFFICIAL_CHECKPOINTS[model]
    folder_name = Path(model).expanduser().resolve().name if Path(model).expanduser().is_dir() else None
    if folder_name:
        for base, checkpoint in OFFICIAL_CHECKPOINTS.items():
            if base.split("/")[-1] == folder_name:
                logger.info("folder '%s' matches base model %s; using %s", folder_name, base, checkpoint)
                return checkpoint
    known = ", ".join(sorted({b.split("/")[-1] for b in OFFICIAL_CHECKPOINTS}))
    raise ModelSourceError(f"no LinFusion checkpoint is known for '{model}'; pass --linfusion PATH|HUB_ID "
                           f"(known base models: {known})")


def _from_pretrained(source: str, revision: str | None, local_files_only: bool, model: str,
                     dtype: Any) -> LoadedPipeline:
    """A diffusers pipeline from the hub or a folder, safetensors only (never pickle files)."""
    from diffusers import DiffusionPipeline

    index_file = resolve_files(source, ["model_index.json"], revision, local_files_only)
    index = json.loads(index_file.paths["model_index.json"].read_text())
    extra: dict[str, Any] = {}
    if "safety_checker" in index:
        extra.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = DiffusionPipeline.from_pretrained(
            source, revision=revision, torch_dtype=dtype, use_safetensors=True,
            local_files_only=local_files_only, **extra)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelSourceError(f"cannot load the pipeline '{source}': {str(exc).splitlines()[0]}; "
                               f"{OFFLINE_HINT}") from exc
    return LoadedPipeline(pipe, None, model, index_file.source, index_file.revision, None, None, False)


def load_vae(source: str, dtype: Any, local_files_only: bool = False):
    """An AutoencoderKL from a folder or hub id (safetensors only)."""
    from diffusers import AutoencoderKL

    files = resolve_files(source, ["config.json", "diffusion_pytorch_model.safetensors"],
                          local_files_only=local_files_only)
    try:
        return AutoencoderKL.from_pretrained(str(files.paths["config.json"].parent), torch_dtype=dtype,
                                             use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot load the VAE '{source}': {str(exc).splitlines()[0]}") from exc
