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
from .hub import (OFFLINE_HINT, HubUnavailableError, ModelSourceError, first_line, looks_like_path,
                  resolve_files)
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
    Without a reachable hub, hub ids come from the local cache, and a miss fails within seconds.
    """
    try:
        return _load(model, linfusion, random_weights, dtype, seed, revision, local_files_only, vae)
    except HubUnavailableError as exc:
        if random_weights or exc.source == vae:  # the preset remedies would not help
            raise
        raise exc.with_remedies(*_offline_remedies(PRESETS.get(model))) from exc.__cause__


def _load(model: str, linfusion: str | None, random_weights: bool, dtype: Any, seed: int,
          revision: str | None, local_files_only: bool, vae: str | None) -> LoadedPipeline:
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
        raise ModelSourceError(f"a random-weight build needs a preset ({', '.join(PRESETS)}); "
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


def _offline_remedies(preset: Preset | None) -> tuple[tuple[str, ...], str]:
    """What to do when the hub is out of reach: API wording, and the CLI wording for ``cli_hint``."""
    if preset is not None:
        build = f"use random_weights=True to build the '{preset.name}' architecture with seeded random weights"
        return (build, "pass a local folder that holds the files"), OFFLINE_HINT
    return (("pass a local folder that holds the files", "use a preset with random_weights=True"),
            "pass a local folder that holds the files, or a preset with --random-weights")


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
    raise ModelSourceError(f"no LinFusion checkpoint is known for '{model}' (known base models: {known})",
                           "pass linfusion= a LinFusion folder or hub id", "pass --linfusion PATH|HUB_ID")


def _from_pretrained(source: str, revision: str | None, local_files_only: bool, model: str,
                     dtype: Any) -> LoadedPipeline:
    """A diffusers pipeline from the hub or a folder, safetensors only (never pickle files)."""
    index_file = resolve_files(source, ["model_index.json"], revision, local_files_only)
    from diffusers import DiffusionPipeline  # after the lookup: a missing model fails before this slow import

    index = json.loads(index_file.paths["model_index.json"].read_text())
    extra: dict[str, Any] = {}
    if "safety_checker" in index:
        extra.update(safety_checker=None, requires_safety_checker=False)
    try:
        # Once the hub proved unreachable, diffusers must not ask it again (and retry for ~25 s).
        pipe = DiffusionPipeline.from_pretrained(
            source, revision=revision, use_safetensors=True, **dtype_kwarg(dtype),
            local_files_only=local_files_only or index_file.offline, **extra)
    except (OSError, ValueError) as exc:
        remedies, cli_hint = _offline_remedies(PRESETS.get(model))
        raise ModelSourceError(f"cannot load the pipeline '{source}': {first_line(exc)}",
                               ", or ".join(remedies), cli_hint) from exc
    return LoadedPipeline(pipe, None, model, index_file.source, index_file.revision, None, None, False)


def load_vae(source: str, dtype: Any, local_files_only: bool = False):
    """An AutoencoderKL from a folder or hub id (safetensors only)."""
    from diffusers import AutoencoderKL

    files = resolve_files(source, ["config.json", "diffusion_pytorch_model.safetensors"],
                          local_files_only=local_files_only)
    try:
        return AutoencoderKL.from_pretrained(str(files.paths["config.json"].parent), use_safetensors=True,
                                             **dtype_kwarg(dtype))
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot load the VAE '{source}': {first_line(exc)}") from exc


def dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """diffusers' dtype argument of ``from_pretrained``: ``dtype`` from 0.40 (where ``torch_dtype`` is
    deprecated, to be removed in 1.0); older versions ignore ``dtype`` and need ``torch_dtype``."""
    import diffusers
    from packaging.version import Version

    name = "dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype"
    return {name: dtype}
