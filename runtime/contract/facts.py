"""The pipeline facts an export records: what the runtime, the engine builder and the validator
need to know about the model beyond its ONNX files (family, latent geometry, VAE scaling,
SD-XL conditioning flags, architecture widths, the size limits of the graphs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

KINDS = ("sd", "sdxl")


@dataclass(frozen=True)
class PipelineFacts:
    kind: str
    """sd (SD-1.x/2.x) or sdxl."""
    pipeline_class: str
    latent_channels: int
    latent_multiple: int
    """Latent sides must be multiples of this (2 ** (UNet down blocks - 1))."""
    vae_scale_factor: int
    """Pixels per latent pixel."""
    vae_scaling_factor: float
    vae_shift_factor: float | None
    vae_force_upcast: bool
    default_size: int
    """The model's native image side in pixels."""
    text_length: int
    text_encoders: tuple[str, ...]
    """Component names of the text encoders, in the order their states are concatenated."""
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False
    addition_time_embed_dim: int | None = None
    unet_block_channels: tuple[int, ...] | None = None
    """diffusers' block_out_channels of the UNet (None in exports of format 1)."""
    vae_block_channels: tuple[int, ...] | None = None
    """diffusers' block_out_channels of the VAE (None in exports of format 1)."""
    max_size: tuple[int, int] | None = None
    """(width, height) in pixels that the UNet was made to run at batch 1 with no tensor above
    ``tensor_limit`` (``linfusion-export --max-size``). A size is within it when it has no more
    pixels and no longer side, so the portrait orientation is too (``linfusion.runtime.limits``).
    None: an export made before limits were recorded."""
    tensor_limit: int | None = None
    """Elements per tensor that no UNet tensor exceeds up to ``max_size`` at batch 1."""
    max_batch2_size: tuple[int, int] | None = None
    """The largest (width, height) with the aspect ratio of ``max_size`` at which the UNet at batch 2
    (batched classifier-free guidance) stays under the limit; larger sizes run guidance sequentially.
    (0, 0): batch 2 fits at no size. None when unknown or the export has no UNet."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"pipeline kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "text_encoders", tuple(self.text_encoders))
        for name in ("unet_block_channels", "vae_block_channels", "max_size", "max_batch2_size"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))
        for name in ("max_size", "max_batch2_size"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or min(value) < 0):
                raise ValueError(f"{name} must be (width, height), got {value!r}")
        if self.tensor_limit is not None and self.tensor_limit < 1:
            raise ValueError(f"tensor_limit must be positive, got {self.tensor_limit}")

    @property
    def xl(self) -> bool:
        return self.kind == "sdxl"

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this: the latent multiple times the VAE factor."""
        return self.latent_multiple * self.vae_scale_factor

    @property
    def default_guidance_scale(self) -> float:
        """diffusers' default guidance scale for this family."""
        return 5.0 if self.xl else 7.5

    @property
    def native_latent_side(self) -> int:
        return max(self.default_size // self.vae_scale_factor, self.latent_multiple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineFacts:
        """Strict: an unknown key is an error (a newer exporter wrote it), a missing one too unless
        it has a default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TypeError(f"unknown pipeline fact(s) {', '.join(unknown)}")
        return cls(**data)
