"""Finding a UNet's self-attention layers, and checking that a LinFusion config fits them.

Mounting is all or nothing: a checkpoint that misses one ``attn1`` layer or names one the
UNet lacks would leave a model that silently mixes softmax and linear attention, so every
mismatch is an error that names the first offending layer.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn


class CheckpointMismatchError(ValueError):
    """A LinFusion checkpoint does not fit the UNet it is mounted on."""


def self_attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """Every ``attn1`` module of a diffusers UNet, by qualified name, in module order."""
    from diffusers.models.attention_processor import Attention

    from .attention import GeneralizedLinearAttention

    return {name: module for name, module in unet.named_modules()
            if name.rsplit(".", 1)[-1] == "attn1"
            and isinstance(module, (Attention, GeneralizedLinearAttention))}


def module_width(module: nn.Module) -> int:
    return module.to_q.weight.shape[0]


def default_modules_list(unet: nn.Module, projection_mid_divisor: int | None = None
                         ) -> list[dict[str, Any]]:
    """The ``modules_list`` config for a from-scratch LinFusion on ``unet``.

    ``projection_mid_divisor`` sets projection_mid_dim = width // divisor (LinFusion-XL uses 16);
    None keeps the official default, a projection as wide as the layer.
    """
    entries = []
    for name, module in self_attention_modules(unet).items():
        width = module_width(module)
        entries.append({
            "module_name": name,
            "dim_n": width,
            "heads": module.heads,
            "projection_mid_dim": width // projection_mid_divisor if projection_mid_divisor else None,
        })
    if not entries:
        raise CheckpointMismatchError("the UNet has no attn1 self-attention layers to replace")
    return entries


def check_fits(modules_list: list[dict[str, Any]], unet: nn.Module) -> None:
    """Raise CheckpointMismatchError naming the first layer where the config and UNet disagree."""
    targets = self_attention_modules(unet)
    all_modules = dict(unet.named_modules())
    for index, entry in enumerate(modules_list):
        name = entry["module_name"]
        if name not in targets:
            what = "is not a self-attention layer" if name in all_modules else "does not exist"
            raise CheckpointMismatchError(
                f"checkpoint entry {index} '{name}' {what} in this UNet "
                f"(is the checkpoint for another base model?)")
        width = module_width(targets[name])
        if entry["dim_n"] != width:
            raise CheckpointMismatchError(
                f"checkpoint entry {index} '{name}' has width {entry['dim_n']}, the UNet layer has {width}")
    covered = {entry["module_name"] for entry in modules_list}
    for name in targets:
        if name not in covered:
            raise CheckpointMismatchError(
                f"the checkpoint has no entry for the UNet's self-attention layer '{name}'; "
                f"mounting it would mix softmax and linear attention")


def replace_submodule(root: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, attr = qualified_name.rsplit(".", 1)
    parent = functools.reduce(getattr, parent_name.split("."), root)
    setattr(parent, attr, new)
