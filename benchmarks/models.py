"""The models the studies run: seeded random-weight builds of one architecture, in three sizes.

``sd15`` is the real SD-1.5 architecture. ``sd15-small`` keeps its block structure (same
down/up block types, layers per block, head dims 40/80/160, CLIP-L text encoder) with a quarter
of the UNet and VAE channels, so that 2 CPU cores can go well past the native resolution.
``tiny`` is the tiny-sd preset, for smoke tests only.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from linfusion.presets import Preset, get_preset

VARIANTS = ("tiny", "sd15-small", "sd15")


@dataclass(frozen=True)
class FolderPreset(Preset):
    """A preset whose configs live in a folder of our choosing (the down-scaled variant)."""

    root: str = ""

    def config_path(self, *parts: str) -> Path:
        return Path(self.root).joinpath(*parts)


def _small_sd15(folder: Path) -> Preset:
    base = get_preset("sd15")
    for part in ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                 "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"):
        (folder / part).parent.mkdir(parents=True, exist_ok=True)
        (folder / part).write_text(base.config_path(*part.split("/")).read_text())
    unet = base.read_config("unet", "config.json")
    unet.update(block_out_channels=[c // 4 for c in unet["block_out_channels"]], norm_num_groups=16,
                attention_head_dim=2)  # 2 heads on 80 channels: SD-1.5's head dims 40/80/160
    vae = base.read_config("vae", "config.json")
    vae["block_out_channels"] = [c // 4 for c in vae["block_out_channels"]]
    for name, config in (("unet", unet), ("vae", vae)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config, indent=2))
    return FolderPreset("sd15-small", "SD-1.5 blocks, 1/4 channels", None, None, None, root=str(folder))


def preset_for(variant: str) -> Preset:
    if variant == "tiny":
        return get_preset("tiny-sd")
    if variant == "sd15":
        return get_preset("sd15")
    if variant == "sd15-small":
        return _small_sd15(Path(tempfile.mkdtemp(prefix="sd15-small-configs-")))
    raise ValueError(f"unknown variant '{variant}'; choose one of {', '.join(VARIANTS)}")


def build(variant: str, seed: int = 0, keep_softmax: bool = False, dtype: Any = None,
          save_to: Path | None = None) -> tuple[Any, Any]:
    """(LoadedPipeline with LinFusion mounted, a copy of the softmax SDPA UNet or None).

    ``save_to``: also write the base diffusers pipeline (``save_to/diffusers``) and the
    LinFusion checkpoint (``save_to/linfusion``) so another process can load the same model.
    """
    import torch

    from linfusion.checkpoint import LinFusion
    from linfusion.loader import LoadedPipeline
    from linfusion.presets import build_random_pipeline

    preset = preset_for(variant)
    pipe = build_random_pipeline(preset, seed, dtype=dtype)
    if save_to is not None:
        pipe.save_pretrained(save_to / "diffusers", safe_serialization=True)
    softmax = copy.deepcopy(pipe.unet) if keep_softmax else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7919)
        lf = LinFusion.from_unet(pipe.unet, preset.projection_mid_divisor)
    if save_to is not None:
        lf.save_pretrained(save_to / "linfusion")
    lf.mount(pipe.unet)
    loaded = LoadedPipeline(pipe, lf, variant, preset.base_model, None, None, None, True, preset)
    return loaded, softmax


def export(loaded: Any, output: Path, components: list[str] | None = None) -> Path:
    """The project's exporter (with its parity check), quietly; returns the export directory."""
    from linfusion.export.exporter import export_pipeline

    export_pipeline(loaded, output, components=components, force=True, progress=lambda line: None)
    return output


def pixel_multiple(variant: str) -> int:
    """Image sides must be multiples of this (latent multiple x VAE factor 8)."""
    return 32 if variant == "tiny" else 64


def assets(variant: str, folder: Path) -> Path:
    """``folder`` with the same model three ways: ``export/`` (ONNX, all components),
    ``diffusers/`` (base pipeline, safetensors) and ``linfusion/`` (checkpoint).

    Built once; a later call with the same folder and variant reuses it (``variant.txt``).
    """
    marker = folder / "variant.txt"
    if marker.exists() and marker.read_text() == variant and (folder / "export" / "linfusion.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    loaded, _ = build(variant, save_to=folder)
    export(loaded, folder / "export")
    marker.write_text(variant)
    return folder


def study_parser(doc: str | None, results: Path, steps: int | None = None,
                 repeats: int | None = 5) -> argparse.ArgumentParser:
    """The options every study shares; each study adds its own size options."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="sd15-small", choices=VARIANTS)
    if steps is not None:
        p.add_argument("--steps", type=int, default=steps)
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, help="reuse the model/export built here (models.assets)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a few minutes)")
    p.add_argument("--tiny", action="store_true", help="smoke run on the tiny preset (seconds)")
    p.add_argument("--results", type=Path, default=results)
    return p
