"""What each exported component is: the traced module, its I/O names (optimum's), dtypes and axes.

A ``Component`` knows how to make inputs of any batch and size, so the same description serves
tracing (at one size) and the parity check (at another size and batch 2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from linfusion.runtime.manifest import TensorSpec

TEXT_LENGTH = 77
MAX_BATCH = 1024
MAX_LATENT = 4096  # 32K pixels at the VAE's factor 8


class UNetForExport(nn.Module):
    def __init__(self, unet: nn.Module, xl: bool) -> None:
        super().__init__()
        self.unet = unet
        self.xl = xl

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        # diffusers concatenates text_embeds with float32 time embeddings; eager PyTorch promotes
        # to float32 there, the exporter does not, so promote explicitly (same numbers).
        added = {"text_embeds": text_embeds.float(), "time_ids": time_ids} if self.xl else None
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                         return_dict=False)[0]


class TextEncoderForExport(nn.Module):
    """last_hidden_state, the penultimate hidden state (SD-XL, clip-skip), and the pooled projection."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.projected = hasattr(encoder, "text_projection")

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
        outputs = (out.last_hidden_state, out.hidden_states[-2])
        return outputs + (out.text_embeds,) if self.projected else outputs


class VaeDecoderForExport(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderForExport(nn.Module):
    """Mean and log-variance (the runtime samples), as optimum's ``latent_parameters``."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample).latent_dist.parameters


@dataclass
class Component:
    name: str
    module: nn.Module
    dtype: torch.dtype
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    make_inputs: Callable[[int, int, int, torch.Generator], tuple[torch.Tensor, ...]]
    """(batch, height, width, generator) -> example inputs; height/width in this component's units."""
    spatial_multiple: int
    trace_size: tuple[int, int]

    def dynamic_shapes(self) -> dict[str, dict[int, torch.export.Dim]]:
        """One shared Dim per axis name: every batched input shares ``batch``."""
        dims: dict[str, torch.export.Dim] = {}
        for axis in {a for t in self.inputs for a in t.shape if isinstance(a, str)}:
            if axis == "batch":
                dims[axis] = torch.export.Dim("batch", min=1, max=MAX_BATCH)
            else:
                dims[axis] = torch.export.Dim(axis, min=self.spatial_multiple,
                                              max=MAX_LATENT * self.spatial_multiple)
        return {t.name: {i: dims[a] for i, a in enumerate(t.shape) if isinstance(a, str)}
                for t in self.inputs}


def numpy_dtype(dtype: torch.dtype) -> str:
    return str(torch.empty((), dtype=dtype).numpy().dtype) if dtype != torch.bfloat16 else "bfloat16"


def unet_component(pipe, xl: bool, latent_multiple: int, dtype: torch.dtype) -> Component:
    unet = pipe.unet
    channels = unet.config.in_channels
    context = unet.config.cross_attention_dim
    dt = numpy_dtype(dtype)
    inputs = [TensorSpec("sample", dt, ["batch", channels, "height", "width"]),
              TensorSpec("timestep", "float32", ["batch"]),
              TensorSpec("encoder_hidden_states", dt, ["batch", TEXT_LENGTH, context])]
    pooled = pipe.text_encoder_2.config.projection_dim if xl else 0
    if xl:
        inputs += [TensorSpec("text_embeds", dt, ["batch", pooled]),
                   TensorSpec("time_ids", "float32", ["batch", 6])]

    def make(batch: int, height: int, width: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        tensors = (torch.randn(batch, channels, height, width, generator=g).to(dtype),
                   torch.rand(batch, generator=g) * 999.0,
                   torch.randn(batch, TEXT_LENGTH, context, generator=g).to(dtype))
        if xl:
            size = [height * 8.0, width * 8.0]
            tensors += (torch.randn(batch, pooled, generator=g).to(dtype),
                        torch.tensor([size + [0.0, 0.0] + size] * batch))
        return tensors

    return Component("unet", UNetForExport(unet, xl), dtype, inputs,
                     [TensorSpec("out_sample", dt, ["batch", unet.config.out_channels, "height", "width"])],
                     make, latent_multiple, (2 * latent_multiple, 3 * latent_multiple))


def text_encoder_component(name: str, encoder: nn.Module, dtype: torch.dtype) -> Component:
    wrapper = TextEncoderForExport(encoder)
    dt = numpy_dtype(dtype)
    hidden = encoder.config.hidden_size
    outputs = [TensorSpec("last_hidden_state", dt, ["batch", TEXT_LENGTH, hidden]),
               TensorSpec("penultimate_hidden_state", dt, ["batch", TEXT_LENGTH, hidden])]
    if wrapper.projected:
        outputs.append(TensorSpec("text_embeds", dt, ["batch", encoder.config.projection_dim]))
    vocab = encoder.config.vocab_size

    def make(batch: int, height: int, width: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        ids = torch.randint(0, vocab - 2, (batch, TEXT_LENGTH), generator=g)
        ids[:, 0] = vocab - 2  # bos, then eos (the highest id) where the pooled output is read
        ids[:, torch.randint(2, TEXT_LENGTH, (1,), generator=g).item()] = vocab - 1
        return (ids,)

    return Component(name, wrapper, dtype, [TensorSpec("input_ids", "int64", ["batch", TEXT_LENGTH])],
                     outputs, make, 1, (1, 1))


def vae_components(vae: nn.Module, latent_multiple: int, dtype: torch.dtype) -> list[Component]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = vae.config.latent_channels
    dt = numpy_dtype(dtype)

    def make_latents(batch, height, width, g):
        return (torch.randn(batch, latents, height, width, generator=g).to(dtype),)

    def make_images(batch, height, width, g):
        return ((torch.rand(batch, 3, height, width, generator=g) * 2 - 1).to(dtype),)

    decoder = Component(
        "vae_decoder", VaeDecoderForExport(vae), dtype,
        [TensorSpec("latent_sample", dt, ["batch", latents, "latent_height", "latent_width"])],
        [TensorSpec("sample", dt, ["batch", 3, "image_height", "image_width"])],
        make_latents, 1, (2 * latent_multiple, 3 * latent_multiple))
    encoder = Component(
        "vae_encoder", VaeEncoderForExport(vae), dtype,
        [TensorSpec("sample", dt, ["batch", 3, "image_height", "image_width"])],
        [TensorSpec("latent_parameters", dt, ["batch", 2 * latents, "latent_height", "latent_width"])],
        make_images, factor, (2 * latent_multiple * factor, 3 * latent_multiple * factor))
    return [decoder, encoder]
