"""The torch side of each component kind: the traced module and inputs of any batch and size.

The I/O names, dtypes and axes come from the contract (``linfusion.runtime.contract``); this
module adds the wrapper that is traced and an input maker, so the same description serves
tracing (at one size), the parity check (at another size and batch 2) and validation.
``build_component`` dispatches on the registry entry's role.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from linfusion.runtime.contract import (
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    ComponentKind,
    Role,
    TensorSpec,
    component_kind,
    text_encoder_io,
    unet_io,
    vae_decoder_io,
    vae_encoder_io,
)
from torch import nn

TEXT_LENGTH = 77
MAX_BATCH = 1024
MAX_LATENT = 4096  # 32K pixels at the VAE's factor 8


class UNetForExport(nn.Module):
    def __init__(self, unet: nn.Module, xl: bool) -> None:
        super().__init__()
        self.unet = unet
        self.xl = xl

    def forward(self, latents, t, context, pooled=None, micro_conditioning=None):
        # diffusers concatenates the pooled embedding with float32 time embeddings; eager PyTorch
        # promotes to float32 there, the exporter does not, so promote explicitly (same numbers).
        added = dict(text_embeds=pooled.float(), time_ids=micro_conditioning) if self.xl else None  # noqa: C408 - diffusers' kwargs
        return self.unet(latents, t, context, added_cond_kwargs=added, return_dict=False)[0]


class TextEncoderForExport(nn.Module):
    """last_hidden_state, the penultimate hidden state (SD-XL, clip-skip), and the pooled projection."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.projected = hasattr(encoder, "text_projection")

    def forward(self, ids):
        out = self.encoder(ids, output_hidden_states=True, return_dict=True)
        outputs = (out.last_hidden_state, out.hidden_states[-2])
        return outputs + (out.text_embeds,) if self.projected else outputs


class VaeDecoderForExport(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


class VaeEncoderForExport(nn.Module):
    """Mean and log-variance (the runtime samples), as optimum's ``latent_parameters``."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images):
        return self.vae.encode(images).latent_dist.parameters


@dataclass
class Component:
    name: str
    kind: ComponentKind
    module: nn.Module
    dtype: torch.dtype
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    make_inputs: Callable[[int, int, int, torch.Generator], tuple[torch.Tensor, ...]]
    """(batch, height, width, generator) -> example inputs; height/width in this component's units."""
    spatial_multiple: int
    trace_size: tuple[int, int]

    def dynamic_shapes(self) -> tuple[dict[int, torch.export.Dim], ...]:
        """One shared Dim per axis name (every batched input shares ``batch``), positionally."""
        dims: dict[str, torch.export.Dim] = {}
        for axis in {a for t in self.inputs for a in t.shape if isinstance(a, str)}:
            if axis == "batch":
                dims[axis] = torch.export.Dim("batch", min=1, max=MAX_BATCH)
            else:
                dims[axis] = torch.export.Dim(axis, min=self.spatial_multiple,
                                              max=MAX_LATENT * self.spatial_multiple)
        return tuple({i: dims[a] for i, a in enumerate(t.shape) if isinstance(a, str)} for t in self.inputs)


def numpy_dtype(dtype: torch.dtype) -> str:
    return str(torch.empty((), dtype=dtype).numpy().dtype) if dtype != torch.bfloat16 else "bfloat16"


def unet_inputs_maker(channels: int, context: int, pooled: int | None, xl: bool, dtype: torch.dtype,
                      latent: int) -> Callable[[int, int, int, torch.Generator], tuple[torch.Tensor, ...]]:
    """The UNet's (and the ControlNet's) sample, timestep, text and SD-XL conditioning inputs;
    ``latent``: the VAE's latent channels."""
    def make(batch: int, height: int, width: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        sample = torch.randn(batch, channels, height, width, generator=g)
        if channels == 2 * latent + 1:  # an inpainting UNet: latents, a 0/1 mask, masked-image latents
            sample[:, latent] = (torch.rand(batch, height, width, generator=g) < 0.5).float()
        tensors = (sample.to(dtype),
                   torch.rand(batch, generator=g) * 999.0,
                   torch.randn(batch, TEXT_LENGTH, context, generator=g).to(dtype))
        if xl:
            size = [height * 8.0, width * 8.0]
            tensors += (torch.randn(batch, pooled, generator=g).to(dtype),
                        torch.tensor([size + [0.0, 0.0] + size] * batch))
        return tensors
    return make


def unet_component(pipe, xl: bool, latent_multiple: int, dtype: torch.dtype) -> Component:
    unet = pipe.unet
    channels = unet.config.in_channels
    context = unet.config.cross_attention_dim
    pooled = pipe.text_encoder_2.config.projection_dim if xl else None
    inputs, outputs = unet_io(numpy_dtype(dtype), channels, unet.config.out_channels, context, TEXT_LENGTH, pooled)
    make = unet_inputs_maker(channels, context, pooled, xl, dtype, pipe.vae.config.latent_channels)
    return Component(UNET.name, UNET, UNetForExport(unet, xl), dtype, inputs, outputs,
                     make, latent_multiple, (2 * latent_multiple, 3 * latent_multiple))


def text_encoder_component(name: str, encoder: nn.Module, dtype: torch.dtype) -> Component:
    wrapper = TextEncoderForExport(encoder)
    projection = encoder.config.projection_dim if wrapper.projected else None
    inputs, outputs = text_encoder_io(numpy_dtype(dtype), encoder.config.hidden_size, projection, TEXT_LENGTH)
    vocab = encoder.config.vocab_size

    def make(batch: int, height: int, width: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        ids = torch.randint(0, vocab - 2, (batch, TEXT_LENGTH), generator=g)
        ids[:, 0] = vocab - 2  # bos, then eos (the highest id) where the pooled output is read
        ids[:, torch.randint(2, TEXT_LENGTH, (1,), generator=g).item()] = vocab - 1
        return (ids,)

    return Component(name, component_kind(name), wrapper, dtype, inputs, outputs, make, 1, (1, 1))


def vae_components(vae: nn.Module, latent_multiple: int, dtype: torch.dtype) -> list[Component]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = vae.config.latent_channels
    dt = numpy_dtype(dtype)

    def make_latents(batch, height, width, g):
        return (torch.randn(batch, latents, height, width, generator=g).to(dtype),)

    def make_images(batch, height, width, g):
        return ((torch.rand(batch, 3, height, width, generator=g) * 2 - 1).to(dtype),)

    decoder = Component(VAE_DECODER.name, VAE_DECODER, VaeDecoderForExport(vae), dtype,
                        *vae_decoder_io(dt, latents), make_latents, 1, (2 * latent_multiple, 3 * latent_multiple))
    encoder = Component(VAE_ENCODER.name, VAE_ENCODER, VaeEncoderForExport(vae), dtype,
                        *vae_encoder_io(dt, latents), make_images, factor,
                        (2 * latent_multiple * factor, 3 * latent_multiple * factor))
    return [decoder, encoder]


def build_component(kind: ComponentKind, pipe, xl: bool, latent_multiple: int, dtype: torch.dtype,
                    name: str | None = None) -> Component:
    """The Component of registry entry ``kind`` (named ``name``, default the kind's) for a loaded
    diffusers pipeline; with ControlNets attached (``export.controlnet``) the UNet takes residuals."""
    from . import controlnet

    if kind.role is Role.CONTROL:
        if (name or kind.name) not in controlnet.controlnets_of(pipe):
            raise KeyError(f"the pipeline has no {name or kind.name}: export it with --controlnet")
        return controlnet.controlnet_component(name or kind.name, pipe, xl, latent_multiple, dtype)
    module = getattr(pipe, kind.source_module, None)
    if module is None:
        raise KeyError(f"the pipeline has no {kind.source_module} for {kind.name}")
    if kind.role is Role.TEXT_ENCODER:
        return text_encoder_component(kind.name, module, dtype)
    if kind.role is Role.DENOISER:
        if controlnet.controlnets_of(pipe):
            return controlnet.unet_with_residuals_component(pipe, xl, latent_multiple, dtype)
        return unet_component(pipe, xl, latent_multiple, dtype)
    return next(c for c in vae_components(module, latent_multiple, dtype) if c.kind is kind)
