"""Image conversions between the VAE's [-1, 1] NCHW float arrays and PIL / uint8, as diffusers does them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """VAE output [-1, 1] NCHW -> [0, 1] NHWC float32 (diffusers' output_type="np")."""
    return np.clip(images.astype(np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


def to_pil(images: np.ndarray) -> list[Any]:
    """[0, 1] NHWC -> PIL images, rounding as diffusers' numpy_to_pil does."""
    from PIL import Image

    return [Image.fromarray(frame) for frame in (images * 255).round().astype(np.uint8)]


def load_image(source: str | Path | Any, width: int | None, height: int | None,
               multiple: int) -> np.ndarray:
    """A path or PIL image -> [1, 3, H, W] float32 in [-1, 1], resized like VaeImageProcessor.

    Without an explicit size the image keeps its own, rounded down to ``multiple``.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, Path)):
        try:
            with Image.open(source) as opened:
                image = opened.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"cannot read init image {source}: {exc}") from exc
    else:
        image = source.convert("RGB")
    width = width or image.width // multiple * multiple
    height = height or image.height // multiple * multiple
    if width < multiple or height < multiple:
        raise ValueError(f"init image {image.width}x{image.height} is smaller than {multiple} px")
    if (image.width, image.height) != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return (array * 2 - 1).transpose(2, 0, 1)[None]
