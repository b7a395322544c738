"""Model presets: named base pipelines with their LinFusion checkpoints and embedded configs.

Each preset ships the architecture configs of every component (``configs/<name>/`` in the
diffusers folder layout), so the real-size models can be built offline with seeded random
weights for size, export and speed work, and the tiny ones for tests.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CLIP_VOCAB_SIZE = 49408
TINY_MERGES = 480


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    base_model: str | None
    """Hub id of the base pipeline; None for the tiny presets, which exist only as configs."""
    linfusion_checkpoint: str | None
    projection_mid_divisor: int | None
    """LinFusion's projection width is dim // divisor (LinFusion-XL: 16); None means dim."""

    @property
    def is_tiny(self) -> bool:
        return self.base_model is None

    def config_path(self, *parts: str) -> Path:
        return Path(str(resources.files("linfusion").joinpath("configs", self.name, *parts)))

    def read_config(self, *parts: str) -> dict[str, Any]:
        return json.loads(self.config_path(*parts).read_text())

    @property
    def model_index(self) -> dict[str, Any]:
        return self.read_config("model_index.json")

    @property
    def is_xl(self) -> bool:
        return "text_encoder_2" in self.model_index


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("sd15", "Stable Diffusion 1.5 with LinFusion-1-5",
           "stable-diffusion-v1-5/stable-diffusion-v1-5", "Yuanshi/LinFusion-1-5", None),
    Preset("sd21", "Stable Diffusion 2.1 (768, v-prediction) with LinFusion-2-1",
           "stabilityai/stable-diffusion-2-1", "Yuanshi/LinFusion-2-1", None),
    Preset("sdxl", "Stable Diffusion XL base 1.0 with LinFusion-XL",
           "stabilityai/stable-diffusion-xl-base-1.0", "Yuanshi/LinFusion-XL", 16),
    Preset("tiny-sd", "Tiny SD-1.x-shaped pipeline with random weights, for tests",
           None, None, None),
    Preset("tiny-sdxl", "Tiny SD-XL-shaped pipeline with random weights, for tests",
           None, None, 8),
    Preset("tiny-sd-inpaint", "Tiny SD-1.x-shaped inpainting pipeline (9-channel UNet) with random weights, "
           "for tests", None, None, None),
    Preset("tiny-sdxl-inpaint", "Tiny SD-XL-shaped inpainting pipeline (9-channel UNet) with random weights, "
           "for tests", None, None, 8),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def build_random_pipeline(preset: Preset, seed: int = 0, local_files_only: bool = True,
                          device: str = "cpu", dtype: Any = None):
    """The preset's pipeline at its real architecture, with seeded random weights (no LinFusion yet).

    Each component is seeded on its own (seed + fixed offset) so that its weights do not depend
    on which other components were built first. ``device="meta"`` builds the architecture
    without allocating weights, for counting parameters of the real-size models. Each component
    is cast to ``dtype`` as soon as it is built, so only one is ever held in float32.
    """
    import diffusers
    import torch
    import transformers

    index = preset.model_index
    components: dict[str, Any] = {}
    for offset, name in enumerate(("unet", "vae", "text_encoder", "text_encoder_2")):
        if name not in index:
            continue
        library, class_name = index[name]
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed + 1000 * offset)
            if library == "diffusers":
                cls = getattr(diffusers, class_name)
                components[name] = cls.from_config(preset.read_config(name, "config.json"))
            else:
                cls = getattr(transformers, class_name)
                config = transformers.CLIPTextConfig.from_json_file(str(preset.config_path(name, "config.json")))
                components[name] = cls(config)
        components[name].eval()
        if dtype is not None:
            components[name].to(dtype=dtype)
    for name in ("tokenizer", "tokenizer_2"):
        if name in index:
            components[name] = load_tokenizer(preset, name, local_files_only)
            encoder = components["text_encoder" + name[len("tokenizer"):]]
            if len(components[name]) != encoder.config.vocab_size:
                raise ValueError(f"{preset.name}: {name} has {len(components[name])} tokens but the "
                                 f"text encoder expects {encoder.config.vocab_size}")
    scheduler_config = preset.read_config("scheduler", "scheduler_config.json")
    components["scheduler"] = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    pipeline_cls = getattr(diffusers, index["_class_name"])
    if preset.is_xl:
        components["force_zeros_for_empty_prompt"] = index.get("force_zeros_for_empty_prompt", True)
    else:
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipeline_cls(**components)


def load_tokenizer(preset: Preset, name: str, local_files_only: bool = True):
    """The real CLIP tokenizer when it is in the local hub cache, else a CLIP-format stand-in.

    The stand-in keeps CLIP's conventions (byte-level BPE with </w>, bos/eos as the last two
    ids, "!" as id 0, padding to 77) and the real vocabulary size, so the text encoders have
    their real size; only the merges differ, learned from a small shipped corpus.
    """
    from transformers import CLIPTokenizer

    from .clip_bpe import corpus_merges, write_clip_tokenizer
    from .hub import ModelSourceError, resolve_files

    if not preset.is_tiny:
        # transformers 5 returns an empty tokenizer instead of failing when files are missing,
        # so the files are resolved explicitly first.
        try:
            files = resolve_files(preset.base_model, ["vocab.json", "merges.txt", "tokenizer_config.json"],
                                  subfolder=name, local_files_only=local_files_only)
            return CLIPTokenizer.from_pretrained(str(files.paths["vocab.json"].parent))
        except ModelSourceError as exc:
            warnings.warn(f"{preset.name}: real {name} unavailable ({exc}); using a CLIP-format "
                          f"stand-in vocabulary of the real size", stacklevel=2)
        vocab_size = CLIP_VOCAB_SIZE
    else:
        vocab_size = preset.read_config("text_encoder", "config.json")["vocab_size"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_clip_tokenizer(Path(tmp), list(corpus_merges(TINY_MERGES)), vocab_size,
                                      preset.read_config(name, "tokenizer_config.json"),
                                      preset.read_config(name, "special_tokens_map.json"))
        return CLIPTokenizer.from_pretrained(str(folder))
