"""Component kinds: one registry entry per kind of exported model, with its I/O names and shapes.

In the spirit of optimum's per-model ONNX configs: the exporter, the validator, the engine
profiles and the pipeline iterate ``REGISTRY`` and ask an entry what they need (its role, the
units of its spatial axes, how its batch grows with classifier-free guidance, whether the
runtime loads it lazily) instead of matching names. The I/O names of every component are
spelled here and nowhere else.

Adding a component (as the ControlNet was) means: its I/O class and spec builder here, a
``ComponentKind`` in ``REGISTRY``, a torch wrapper in ``linfusion.export.components``, and the
pipeline code that feeds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import ClassVar


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    """numpy dtype name: float32, float16, int64 ..."""
    shape: tuple[int | str, ...]
    """Static sizes as ints, dynamic axes by name (see ``Axis``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))


@dataclass(frozen=True)
class LargestTensor:
    """The largest tensor of a component at the export's max size and batch 1."""

    name: str
    """Where it is made: the module path below the component and the op, e.g. ``up_blocks.3/cat``."""
    elements: int
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))


@dataclass(frozen=True)
class ComponentSpec:
    """One exported component as the manifest records it."""

    kind: str
    """Registry name of its kind (``REGISTRY``); the component's own name may differ (controlnet_1)."""
    path: str
    """The ONNX file, relative to the export directory."""
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: str | None = None
    linear_attention_nodes: int = 0
    largest_tensor: LargestTensor | None = None
    """At ``PipelineFacts.max_size`` and batch 1 (None in older exports). Only the UNet is held under
    the tensor limit; the VAE is tiled by the runtime, so its entry says what an untiled run would need."""
    lora_map: str | None = None
    """The LoRA initializer map (parameter name -> ONNX initializer), relative to the export directory."""
    attention_windows: int | None = None
    """Query windows of the softmax self-attention at its largest level (VAE mid-block, ControlNet):
    its score tensors are tokens^2 / windows. None: no such attention, or an export older than format 4
    (whose score matrix is whole)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        if isinstance(self.largest_tensor, dict):  # as read back from the manifest's JSON
            object.__setattr__(self, "largest_tensor", LargestTensor(**self.largest_tensor))

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


class Axis:
    """Names of the dynamic axes, and the units each spatial one counts in."""

    BATCH = "batch"
    HEIGHT = "height"
    WIDTH = "width"
    LATENT_HEIGHT = "latent_height"
    LATENT_WIDTH = "latent_width"
    IMAGE_HEIGHT = "image_height"
    IMAGE_WIDTH = "image_width"
    UNITS: ClassVar[Mapping[str, str]] = MappingProxyType({
        HEIGHT: "latent", WIDTH: "latent", LATENT_HEIGHT: "latent", LATENT_WIDTH: "latent",
        IMAGE_HEIGHT: "image", IMAGE_WIDTH: "image"})
    """Spatial axis -> "latent" (pixels / VAE factor) or "image" (pixels)."""
    VERTICAL = (HEIGHT, LATENT_HEIGHT, IMAGE_HEIGHT)
    _DIVIDED = "_div"

    @staticmethod
    def divided(axis: str, divisor: int) -> str:
        """The name of ``axis`` / ``divisor`` (a UNet level's side, e.g. ``height_div4``)."""
        return axis if divisor == 1 else f"{axis}{Axis._DIVIDED}{divisor}"

    @staticmethod
    def resolve(name: str) -> tuple[str, int] | None:
        """(spatial axis in ``UNITS``, divisor) of an axis name, or None for batch / unknown names."""
        if name in Axis.UNITS:
            return name, 1
        base, _, divisor = name.rpartition(Axis._DIVIDED)
        if base in Axis.UNITS and divisor.isdigit() and int(divisor) > 0:
            return base, int(divisor)
        return None


class TextEncoderIO:
    input_ids = "input_ids"
    last_hidden_state = "last_hidden_state"
    penultimate_hidden_state = "penultimate_hidden_state"
    """The hidden state before the last layer (SD-XL, clip-skip)."""
    text_embeds = "text_embeds"
    """The pooled projection (encoders with a text projection only)."""


class UNetIO:
    sample = "sample"
    timestep = "timestep"
    encoder_hidden_states = "encoder_hidden_states"
    text_embeds = "text_embeds"
    """SD-XL only: the pooled text embedding."""
    time_ids = "time_ids"
    """SD-XL only: original size, crop, target size."""
    out_sample = "out_sample"


class ControlNetIO:
    """Inputs as the UNet's plus the control image and its scale; outputs the residuals that the
    UNet of a ControlNet export takes as inputs of the same names."""

    sample = UNetIO.sample
    timestep = UNetIO.timestep
    encoder_hidden_states = UNetIO.encoder_hidden_states
    text_embeds = UNetIO.text_embeds
    time_ids = UNetIO.time_ids
    controlnet_cond = "controlnet_cond"
    """The control image, [B, 3, H, W] in [0, 1] at the image's (pixel) size."""
    conditioning_scale = "conditioning_scale"
    """[1] float32: multiplies every residual (diffusers' ``conditioning_scale``)."""
    mid_block_residual = "mid_block_residual"

    @staticmethod
    def down_block_residual(index: int) -> str:
        return f"down_block_residual_{index}"


class VaeDecoderIO:
    latent_sample = "latent_sample"
    sample = "sample"


class VaeEncoderIO:
    sample = "sample"
    latent_parameters = "latent_parameters"
    """Mean and log-variance concatenated on the channel axis (optimum's name)."""


def text_encoder_io(dtype: str, hidden: int, projection_dim: int | None,
                    text_length: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    io, b = TextEncoderIO, Axis.BATCH
    outputs = [TensorSpec(io.last_hidden_state, dtype, (b, text_length, hidden)),
               TensorSpec(io.penultimate_hidden_state, dtype, (b, text_length, hidden))]
    if projection_dim:
        outputs.append(TensorSpec(io.text_embeds, dtype, (b, projection_dim)))
    return [TensorSpec(io.input_ids, "int64", (b, text_length))], outputs


def unet_io(dtype: str, in_channels: int, out_channels: int, context: int, text_length: int,
            pooled: int | None, residuals: Residuals | None = None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """``pooled`` (SD-XL's pooled text width) adds the text_embeds and time_ids inputs;
    ``residuals`` (ControlNet exports) the down/mid residual inputs."""
    io, b, h, w = UNetIO, Axis.BATCH, Axis.HEIGHT, Axis.WIDTH
    inputs = [TensorSpec(io.sample, dtype, (b, in_channels, h, w)),
              TensorSpec(io.timestep, "float32", (b,)),
              TensorSpec(io.encoder_hidden_states, dtype, (b, text_length, context))]
    if pooled:
        inputs += [TensorSpec(io.text_embeds, dtype, (b, pooled)), TensorSpec(io.time_ids, "float32", (b, 6))]
    if residuals:
        inputs += residuals.specs(dtype)
    return inputs, [TensorSpec(io.out_sample, dtype, (b, out_channels, h, w))]


@dataclass(frozen=True)
class Residuals:
    """The UNet encoder's skip connections a ControlNet adds to: (channels, side divisor) of each
    down-block residual, in diffusers' order, and of the mid block's."""

    down: tuple[tuple[int, int], ...]
    mid: tuple[int, int]

    @classmethod
    def of_unet(cls, block_channels: Sequence[int], layers_per_block: int | Sequence[int]) -> Residuals:
        """diffusers' UNet2DConditionModel: conv_in, then per block its resnets and (but the last) a
        downsampler; the mid block at the deepest level."""
        layers = [layers_per_block] * len(block_channels) if isinstance(layers_per_block, int) else layers_per_block
        down, divisor = [(block_channels[0], 1)], 1
        for index, (channels, count) in enumerate(zip(block_channels, layers)):
            down += [(channels, divisor)] * count
            if index < len(block_channels) - 1:
                divisor *= 2
                down.append((channels, divisor))
        return cls(tuple(down), (block_channels[-1], divisor))

    @property
    def names(self) -> list[str]:
        return [ControlNetIO.down_block_residual(i) for i in range(len(self.down))] + [ControlNetIO.mid_block_residual]

    def specs(self, dtype: str) -> list[TensorSpec]:
        b, h, w = Axis.BATCH, Axis.HEIGHT, Axis.WIDTH
        return [TensorSpec(name, dtype, (b, channels, Axis.divided(h, divisor), Axis.divided(w, divisor)))
                for name, (channels, divisor) in zip(self.names, (*self.down, self.mid))]


def controlnet_io(dtype: str, in_channels: int, context: int, text_length: int, pooled: int | None,
                  residuals: Residuals) -> tuple[list[TensorSpec], list[TensorSpec]]:
    io, b = ControlNetIO, Axis.BATCH
    inputs, _ = unet_io(dtype, in_channels, in_channels, context, text_length, pooled)
    inputs[3:3] = [TensorSpec(io.controlnet_cond, dtype, (b, 3, Axis.IMAGE_HEIGHT, Axis.IMAGE_WIDTH)),
                   TensorSpec(io.conditioning_scale, "float32", (1,))]
    return inputs, residuals.specs(dtype)


def vae_decoder_io(dtype: str, latent_channels: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    b = Axis.BATCH
    return ([TensorSpec(VaeDecoderIO.latent_sample, dtype, (b, latent_channels, Axis.LATENT_HEIGHT, Axis.LATENT_WIDTH))],
            [TensorSpec(VaeDecoderIO.sample, dtype, (b, 3, Axis.IMAGE_HEIGHT, Axis.IMAGE_WIDTH))])


def vae_encoder_io(dtype: str, latent_channels: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    b = Axis.BATCH
    return ([TensorSpec(VaeEncoderIO.sample, dtype, (b, 3, Axis.IMAGE_HEIGHT, Axis.IMAGE_WIDTH))],
            [TensorSpec(VaeEncoderIO.latent_parameters, dtype,
                        (b, 2 * latent_channels, Axis.LATENT_HEIGHT, Axis.LATENT_WIDTH))])


class Role(str, Enum):
    TEXT_ENCODER = "text_encoder"
    DENOISER = "denoiser"
    VAE_DECODER = "vae_decoder"
    VAE_ENCODER = "vae_encoder"
    CONTROL = "control"
    """Adds residuals to the denoiser's skip connections (a ControlNet)."""


class BatchRule(str, Enum):
    PLAIN = "plain"
    """The request's batch."""
    CFG = "cfg"
    """Doubles with batched classifier-free guidance (negative and positive in one call)."""
    PROMPT_PAIR = "prompt_pair"
    """Positive and negative prompts: from 1 up to twice the request's batch."""


@dataclass(frozen=True)
class ComponentKind:
    name: str
    role: Role
    spatial: str | None
    """Units of the size its spatial inputs are made at: "latent", "image", or None (no spatial axes)."""
    batch_rule: BatchRule = BatchRule.PLAIN
    xl_only: bool = False
    deferred: bool = False
    """The runtime loads it on first use (text-to-image never needs it)."""
    tokenizer: str | None = None
    """The tokenizer folder a text encoder reads its ids from."""
    module: str | None = None
    """The diffusers pipeline attribute holding its model (default: the name)."""
    attached: bool = False
    """Exported only when the export attaches one or more (``--controlnet``), named ``NAME`` or
    ``NAME_<i>``; never part of a plain export."""

    @property
    def required(self) -> bool:
        """Needed for text-to-image."""
        return self.role in (Role.TEXT_ENCODER, Role.DENOISER, Role.VAE_DECODER)

    @property
    def vae(self) -> bool:
        return self.role in (Role.VAE_DECODER, Role.VAE_ENCODER)

    @property
    def source_module(self) -> str:
        return self.module or self.name


TEXT_ENCODER = ComponentKind("text_encoder", Role.TEXT_ENCODER, None, BatchRule.PROMPT_PAIR,
                             tokenizer="tokenizer")
TEXT_ENCODER_2 = ComponentKind("text_encoder_2", Role.TEXT_ENCODER, None, BatchRule.PROMPT_PAIR, xl_only=True,
                               tokenizer="tokenizer_2")
UNET = ComponentKind("unet", Role.DENOISER, "latent", BatchRule.CFG)
VAE_DECODER = ComponentKind("vae_decoder", Role.VAE_DECODER, "latent", module="vae")
VAE_ENCODER = ComponentKind("vae_encoder", Role.VAE_ENCODER, "image", deferred=True, module="vae")
CONTROLNET = ComponentKind("controlnet", Role.CONTROL, "latent", BatchRule.CFG, deferred=True, attached=True)

REGISTRY: tuple[ComponentKind, ...] = (TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER, VAE_ENCODER, CONTROLNET)
_BY_NAME = {k.name: k for k in REGISTRY}


def kinds_for(xl: bool) -> tuple[ComponentKind, ...]:
    """The component kinds a pipeline of this family exports, in export order (attached kinds
    such as the ControlNet only when asked for: ``attached_names``)."""
    return tuple(k for k in REGISTRY if (xl or not k.xl_only) and not k.attached)


def attached_names(kind: ComponentKind, count: int) -> tuple[str, ...]:
    """Component names of ``count`` attached models of ``kind``: NAME for one, NAME_0 ... for several."""
    return (kind.name,) if count == 1 else tuple(f"{kind.name}_{i}" for i in range(count))


def component_kind(name: str) -> ComponentKind:
    """The registry entry of a kind name (or of an attached component's name, controlnet_1);
    KeyError names the known kinds."""
    base, _, index = name.rpartition("_")
    if name not in _BY_NAME and index.isdigit() and base in _BY_NAME and _BY_NAME[base].attached:
        name = base
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown component kind '{name}'; known: {', '.join(_BY_NAME)}") from None


def text_encoder_names(xl: bool) -> tuple[str, ...]:
    return tuple(k.name for k in kinds_for(xl) if k.role is Role.TEXT_ENCODER)
