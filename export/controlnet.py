"""The torch side of the ControlNet: loading or building ControlNets, their traced wrappers, and the
UNet of a ControlNet export, which takes the residuals as inputs.

A ControlNet keeps the softmax attention it ships with (as the official LinFusion does): only
the UNet's self-attention is linear. ``--controlnet random`` builds ``ControlNetModel.from_unet``
with seeded random weights, including the zero-initialised convolutions (zeros would make every
residual zero, and no test could tell a ControlNet from none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from linfusion.runtime.contract import (
    CONTROLNET,
    UNET,
    Axis,
    Residuals,
    attached_names,
    controlnet_io,
    unet_io,
)
from torch import nn

from .components import (
    MAX_BATCH,
    MAX_LATENT,
    TEXT_LENGTH,
    Component,
    UNetForExport,
    numpy_dtype,
    unet_inputs_maker,
)

RANDOM = "random"
SEED_OFFSET = 104_729
"""Random ControlNet i is seeded with seed + SEED_OFFSET + i (the pipeline's parts use other offsets)."""


class ControlNetSourceError(ValueError):
    """A ControlNet that cannot be loaded or does not fit the UNet; the message is one line."""


def residuals_of(unet: nn.Module) -> Residuals:
    return Residuals.of_unet(tuple(unet.config.block_out_channels), unet.config.layers_per_block)


def random_controlnet(unet: nn.Module, vae_factor: int, seed: int) -> nn.Module:
    """``ControlNetModel.from_unet`` with the UNet's encoder weights (LinFusion's extra projections
    left out) and everything else, zero convolutions included, seeded random."""
    from diffusers import ControlNetModel

    levels = max(vae_factor.bit_length() - 1, 0)  # the conditioning embedding downsamples to latent size
    channels = tuple(16 * 2 ** min(i, 4) for i in range(levels + 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels,
                                               load_weights_from_unet=False)
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]
        for conv in zero_convs:
            conv.reset_parameters()
    own = controlnet.state_dict()
    shared = {k: v for k, v in unet.state_dict().items() if k in own and own[k].shape == v.shape}
    controlnet.load_state_dict(shared, strict=False)
    return controlnet.to(dtype=unet.dtype).eval()


def load_controlnet(source: str, unet: nn.Module, vae_factor: int, seed: int, local_files_only: bool = False,
                    revision: str | None = None) -> nn.Module:
    """A diffusers ControlNetModel from a local folder or hub id, or ``random`` (seeded)."""
    if source == RANDOM:
        return random_controlnet(unet, vae_factor, seed)
    from diffusers import ControlNetModel

    try:
        controlnet = ControlNetModel.from_pretrained(source, local_files_only=local_files_only, revision=revision,
                                                     use_safetensors=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ControlNetSourceError(f"cannot load ControlNet '{source}': {first}; pass a local diffusers "
                                    f"ControlNet folder with safetensors weights, or --controlnet random") from None
    check_fits(controlnet, unet, source)
    return controlnet.to(dtype=unet.dtype).eval()


def check_fits(controlnet: nn.Module, unet: nn.Module, source: str) -> None:
    config, unet_config = controlnet.config, unet.config
    for key in ("block_out_channels", "cross_attention_dim", "in_channels", "layers_per_block"):
        if _plain(config[key]) != _plain(unet_config[key]):
            raise ControlNetSourceError(f"ControlNet '{source}' has {key} {_plain(config[key])}, the UNet "
                                        f"{_plain(unet_config[key])}: it was trained for another base model")
    if config.get("global_pool_conditions"):
        raise ControlNetSourceError(f"ControlNet '{source}' pools its conditions (a shuffle ControlNet), which "
                                    f"this export does not support")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def attach_controlnets(loaded, sources: list[str], seed: int = 0, local_files_only: bool = False) -> None:
    """Load each ControlNet and keep them, with their sources, on ``loaded`` (``controlnets_of``)."""
    pipe = loaded.pipeline
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    base_seed = loaded.seed if loaded.seed is not None else seed
    models = [load_controlnet(source, pipe.unet, vae_factor, base_seed + SEED_OFFSET + i, local_files_only)
              for i, source in enumerate(sources)]
    pipe.linfusion_controlnets = dict(zip(attached_names(CONTROLNET, len(models)), models))
    loaded.controlnet_sources = list(sources)


def attach_recorded(loaded, source: dict[str, Any]) -> None:
    """Rebuild the ControlNets an export's manifest source records (validation's reference)."""
    sources = source.get("controlnets")
    if sources:
        attach_controlnets(loaded, list(sources), int(source.get("seed") or 0))


def component_names(count: int) -> tuple[str, ...]:
    return attached_names(CONTROLNET, count) if count else ()


def controlnets_of(pipe) -> dict[str, nn.Module]:
    """Component name -> ControlNet attached to a diffusers pipeline (empty for plain exports)."""
    return getattr(pipe, "linfusion_controlnets", None) or {}


def provenance(loaded) -> dict[str, Any]:
    """The manifest source entry (only when ControlNets are attached, so plain manifests stay as they were)."""
    sources = getattr(loaded, "controlnet_sources", None)
    return {"controlnets": sources} if sources else {}


class ControlNetForExport(nn.Module):
    """(sample, t, context, control image, scale[, pooled, time_ids]) -> down residuals..., mid residual."""

    def __init__(self, controlnet: nn.Module, xl: bool) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.xl = xl

    def forward(self, latents, t, context, image, scale, pooled=None, micro_conditioning=None):
        added = dict(text_embeds=pooled.float(), time_ids=micro_conditioning) if self.xl else None  # noqa: C408
        down, mid = self.controlnet(latents, t, context, controlnet_cond=image,
                                    conditioning_scale=scale.to(latents.dtype), added_cond_kwargs=added,
                                    return_dict=False)
        return (*down, mid)


class UNetWithResidualsForExport(UNetForExport):
    """The UNet with diffusers' down_block_additional_residuals / mid_block_additional_residual as inputs."""

    def forward(self, latents, t, context, *rest):
        extra = 2 if self.xl else 0
        pooled, micro = (rest[0], rest[1]) if self.xl else (None, None)
        *down, mid = rest[extra:]
        added = dict(text_embeds=pooled.float(), time_ids=micro) if self.xl else None  # noqa: C408
        return self.unet(latents, t, context, added_cond_kwargs=added, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]


@dataclass
class DerivedComponent(Component):
    """A component whose spatial axes are all multiples of two roots, so that torch.export sees the
    residuals' sides (height / 2^k) and the control image's (height x VAE factor) as what they are."""

    vae_factor: int = 8
    varargs_from: int | None = None
    """Inputs from this position on are the wrapper's ``*rest`` (torch.export wants them as one tuple)."""

    def dynamic_shapes(self) -> tuple[dict[int, Any], ...]:
        m = self.spatial_multiple
        roots = {"height": torch.export.Dim("height_units", min=1, max=MAX_LATENT // m),
                 "width": torch.export.Dim("width_units", min=1, max=MAX_LATENT // m)}
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)

        def dim(axis: str):
            if axis == Axis.BATCH:
                return batch
            base, divisor = Axis.resolve(axis)
            root = roots["height" if base in Axis.VERTICAL else "width"]
            scale = m // divisor * (self.vae_factor if Axis.UNITS[base] == "image" else 1)
            return root if scale == 1 else scale * root

        shapes = tuple({i: dim(a) for i, a in enumerate(t.shape) if isinstance(a, str)} for t in self.inputs)
        if self.varargs_from is None:
            return shapes
        return (*shapes[:self.varargs_from], shapes[self.varargs_from:])


def unet_with_residuals_component(pipe, xl: bool, latent_multiple: int, dtype: torch.dtype) -> Component:
    unet = pipe.unet
    residuals = residuals_of(unet)
    channels, context = unet.config.in_channels, unet.config.cross_attention_dim
    pooled = pipe.text_encoder_2.config.projection_dim if xl else None
    inputs, outputs = unet_io(numpy_dtype(dtype), channels, unet.config.out_channels, context, TEXT_LENGTH, pooled,
                              residuals)
    base = unet_inputs_maker(channels, context, pooled, xl, dtype, pipe.vae.config.latent_channels)

    def make(batch: int, height: int, width: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        extra = tuple(torch.randn(batch, c, height // d, width // d, generator=g).to(dtype) * 0.5
                      for c, d in (*residuals.down, residuals.mid))
        return base(batch, height, width, g) + extra

    return DerivedComponent(UNET.name, UNET, UNetWithResidualsForExport(unet, xl), dtype, inputs, outputs, make,
                            latent_multiple, (2 * latent_multiple, 3 * latent_multiple), _vae_factor(pipe),
                            varargs_from=3)


def controlnet_component(name: str, pipe, xl: bool, latent_multiple: int, dtype: torch.dtype) -> Component:
    controlnet = controlnets_of(pipe)[name].to(dtype=dtype)
    unet = pipe.unet
    channels, context = unet.config.in_channels, unet.config.cross_attention_dim
    pooled = pipe.text_encoder_2.config.projection_dim if xl else None
    inputs, outputs = controlnet_io(numpy_dtype(dtype), channels, context, TEXT_LENGTH, pooled, residuals_of(unet))
    base = unet_inputs_maker(channels, context, pooled, xl, dtype, pipe.vae.config.latent_channels)
    factor = _vae_factor(pipe)

    def make(batch: int, height: int, width: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        tensors = base(batch, height, width, g)
        image = torch.rand(batch, 3, height * factor, width * factor, generator=g).to(dtype)
        scale = torch.rand(1, generator=g) + 0.5
        return tensors[:3] + (image, scale) + tensors[3:]

    return DerivedComponent(name, CONTROLNET, ControlNetForExport(controlnet, xl), dtype, inputs, outputs, make,
                            latent_multiple, (2 * latent_multiple, 3 * latent_multiple), factor)


def _vae_factor(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)
