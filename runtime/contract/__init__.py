"""The export contract, owned by the runtime (the bottom layer, torch-free).

* ``ops``: the linear-attention op and its TensorRT plugin names.
* ``facts``: ``PipelineFacts``, the typed pipeline facts of an export.
* ``components``: ``TensorSpec``/``ComponentSpec``, the I/O names of every component, and
  ``REGISTRY``, one entry per component kind.

The manifest (``linfusion.runtime.manifest``) serialises these; the exporter writes them and the
engine builder, the validator and the runtime read them.
"""

from . import ops
from .components import (
    CONTROLNET,
    REGISTRY,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    Axis,
    BatchRule,
    ComponentKind,
    ComponentSpec,
    ControlNetIO,
    Residuals,
    Role,
    TensorSpec,
    TextEncoderIO,
    UNetIO,
    VaeDecoderIO,
    VaeEncoderIO,
    attached_names,
    component_kind,
    controlnet_io,
    kinds_for,
    text_encoder_io,
    text_encoder_names,
    unet_io,
    vae_decoder_io,
    vae_encoder_io,
)
from .facts import PipelineFacts

__all__ = ["CONTROLNET", "REGISTRY", "TEXT_ENCODER", "TEXT_ENCODER_2", "UNET", "VAE_DECODER", "VAE_ENCODER", "Axis", "BatchRule",
           "ComponentKind", "ComponentSpec", "ControlNetIO", "PipelineFacts", "Residuals", "Role", "TensorSpec", "TextEncoderIO", "UNetIO",
           "VaeDecoderIO", "VaeEncoderIO", "attached_names", "component_kind", "controlnet_io", "kinds_for", "ops", "text_encoder_io",
           "text_encoder_names", "unet_io", "vae_decoder_io", "vae_encoder_io"]
