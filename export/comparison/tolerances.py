"""Per-precision pass bounds, measured on the tiny presets and set with margin (docs/validation.md).

One table serves the export's parity check and ``linfusion-validate``, so an export that passed
its own check is held to the same bound when validated later at other sizes and timesteps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Tolerance:
    """Bounds for one output: a check passes when every bound holds."""

    max_rel: float
    """max |got - ref| / max |ref| (error relative to the output's scale, not per element)."""
    cosine: float
    """Minimum cosine similarity between got and ref, flattened."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ImageTolerance:
    """Bounds for the end-to-end images (values in [0, 1], differences reported in 8-bit levels)."""

    psnr: float
    max_pixel_diff: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_rel=1e-4, cosine=0.999999),
    "fp16": Tolerance(max_rel=2e-2, cosine=0.99998),
    "bf16": Tolerance(max_rel=1e-1, cosine=0.995),
}

IMAGE_TOLERANCES: dict[str, ImageTolerance] = {
    "fp32": ImageTolerance(psnr=50.0, max_pixel_diff=4),
    "fp16": ImageTolerance(psnr=40.0, max_pixel_diff=16),
    "bf16": ImageTolerance(psnr=24.0, max_pixel_diff=128),
}

PRECISIONS = tuple(TOLERANCES)


def tolerance_for(precision: str) -> Tolerance:
    try:
        return TOLERANCES[precision]
    except KeyError:
        raise ValueError(f"no tolerance for precision '{precision}'; known: {', '.join(PRECISIONS)}") from None
