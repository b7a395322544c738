"""The LinFusion module set and its on-disk format, compatible with the official checkpoints.

An official checkpoint (Yuanshi/LinFusion-1-5, -2-1, -XL) is a diffusers-style folder:
``config.json`` with ``modules_list`` entries ``{module_name, dim_n, heads, projection_mid_dim}``
and ``diffusion_pytorch_model.safetensors`` with keys ``{i}.to_q.weight`` ... where ``i`` is the
entry's index. Only safetensors is ever read: pickle files are never opened.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention import GeneralizedLinearAttention
from .hub import HubUnavailableError, ModelSourceError, resolve_files
from .mount import check_fits, default_modules_list, replace_submodule, self_attention_modules

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# The diffusers version the official checkpoints were saved with; written back for byte-compatibility.
SAVED_DIFFUSERS_VERSION = "0.30.0"

# Official pairing of base pipelines with LinFusion checkpoints (from the LinFusion repo).
OFFICIAL_CHECKPOINTS = {
    "runwayml/stable-diffusion-v1-5": "Yuanshi/LinFusion-1-5",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "Yuanshi/LinFusion-1-5",
    "SG161222/Realistic_Vision_V4.0_noVAE": "Yuanshi/LinFusion-1-5",
    "Lykon/dreamshaper-8": "Yuanshi/LinFusion-1-5",
    "stabilityai/stable-diffusion-2-1": "Yuanshi/LinFusion-2-1",
    "stabilityai/stable-diffusion-xl-base-1.0": "Yuanshi/LinFusion-XL",
}


class LinFusion(nn.Module):
    """One GeneralizedLinearAttention per UNet self-attention layer, keyed by position."""

    def __init__(self, modules_list: list[dict[str, Any]]) -> None:
        super().__init__()
        self.modules_list = [validate_entry(i, entry) for i, entry in enumerate(modules_list)]
        for i, entry in enumerate(self.modules_list):
            self.add_module(str(i), GeneralizedLinearAttention(
                entry["dim_n"], entry["heads"], entry["projection_mid_dim"]))
        self.source: str | None = None
        self.revision: str | None = None
        # Bookkeeping keys of a loaded config.json ("_class_name", "_diffusers_version"), kept so
        # that saving a loaded checkpoint writes its config back unchanged.
        self.config_metadata = {"_class_name": "LinFusion", "_diffusers_version": SAVED_DIFFUSERS_VERSION}

    @property
    def config(self) -> dict[str, Any]:
        return {"modules_list": self.modules_list}

    def layers(self) -> dict[str, GeneralizedLinearAttention]:
        """The attention modules by the UNet module name they replace."""
        return {entry["module_name"]: getattr(self, str(i)) for i, entry in enumerate(self.modules_list)}

    @classmethod
    def from_unet(cls, unet: nn.Module, projection_mid_divisor: int | None = None,
                  copy_attention_weights: bool = True) -> LinFusion:
        """A fresh LinFusion for any UNet: the starting point for distillation or random-weight work.

        Copying W_q, W_k, W_v and W_o from the UNet's softmax layers keeps the layer close to the
        model it replaces; the projections P keep PyTorch's default initialisation.
        """
        model = cls(default_modules_list(unet, projection_mid_divisor))
        model.to(dtype=next(unet.parameters()).dtype)
        if copy_attention_weights:
            targets = self_attention_modules(unet)
            with torch.no_grad():
                for name, layer in model.layers().items():
                    original = targets[name]
                    for attr in ("to_q", "to_k", "to_v"):
                        getattr(layer, attr).weight.copy_(getattr(original, attr).weight)
                    layer.to_out[0].weight.copy_(original.to_out[0].weight)
                    layer.to_out[0].bias.copy_(original.to_out[0].bias)
        return model

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, revision: str | None = None,
                        local_files_only: bool = False) -> LinFusion:
        """Load an official-format checkpoint from a local folder or a hub id (safetensors only)."""
        from safetensors.torch import load_file

        try:
            files = resolve_files(str(source), [CONFIG_NAME, WEIGHTS_NAME], revision, local_files_only)
        except HubUnavailableError as exc:
            raise exc.with_remedies((f"pass a local folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}",
                                     "use LinFusion.from_unet(unet) for a fresh one"), None) from exc.__cause__
        try:
            config = json.loads(files.paths[CONFIG_NAME].read_text())
            modules_list = config["modules_list"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelSourceError(f"{files.paths[CONFIG_NAME]} is not a LinFusion config "
                                   f"(needs 'modules_list'): {exc}") from exc
        model = cls(modules_list)
        try:
            state = load_file(files.paths[WEIGHTS_NAME])
        except Exception as exc:
            raise ModelSourceError(f"cannot read {files.paths[WEIGHTS_NAME]}: {exc}") from exc
        missing, unexpected = _key_diff(model.state_dict(), state)
        if missing or unexpected:
            raise ModelSourceError(
                f"{files.paths[WEIGHTS_NAME]} does not match its config: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        for key, tensor in model.state_dict().items():
            if state[key].shape != tensor.shape:
                raise ModelSourceError(f"{files.paths[WEIGHTS_NAME]}: '{key}' has shape "
                                       f"{tuple(state[key].shape)}, config implies {tuple(tensor.shape)}")
        model.load_state_dict(state)
        model.source, model.revision = files.source, files.revision
        model.config_metadata.update({k: v for k, v in config.items() if k.startswith("_")})
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the official layout; the folder appears only once both files are complete."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        config = {**self.config_metadata, **self.config}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = {key: tensor.detach().contiguous() for key, tensor in self.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if directory.exists():
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                os.replace(tmp / name, directory / name)
            tmp.rmdir()
        else:
            os.replace(tmp, directory)

    def mount(self, unet: nn.Module) -> None:
        """Replace every ``attn1`` of ``unet`` with this model's layers, after checking the fit."""
        check_fits(self.modules_list, unet)
        reference = next(unet.parameters())
        self.to(device=reference.device, dtype=reference.dtype)
        for name, layer in self.layers().items():
            replace_submodule(unet, name, layer)


def validate_entry(index: int, entry: dict[str, Any]) -> dict[str, Any]:
    try:
        clean = {"module_name": str(entry["module_name"]), "dim_n": int(entry["dim_n"]),
                 "heads": int(entry["heads"]),
                 "projection_mid_dim": entry.get("projection_mid_dim")}
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelSourceError(f"modules_list entry {index} is malformed: {entry!r}") from exc
    mid = clean["projection_mid_dim"]
    if mid is not None and (not isinstance(mid, int) or mid <= 0):
        raise ModelSourceError(f"modules_list entry {index}: projection_mid_dim must be null or "
                               f"a positive int, got {mid!r}")
    if clean["dim_n"] <= 0 or clean["heads"] <= 0 or clean["dim_n"] % clean["heads"]:
        raise ModelSourceError(f"modules_list entry {index}: width {clean['dim_n']} does not split "
                               f"into {clean['heads']} heads")
    return clean


def _key_diff(expected: dict[str, Any], found: dict[str, Any]) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
