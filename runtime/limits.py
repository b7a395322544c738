"""The size limits an export records, applied to a request before any model runs.

``linfusion-export --max-size WxH --tensor-limit N`` token-chunks the UNet so that at batch 1 no
tensor exceeds N elements up to W x H, and records the largest size at which batch 2 (batched
classifier-free guidance) still does (``PipelineFacts.max_size``, ``tensor_limit``,
``max_batch2_size``).

Every UNet tensor grows with the pixel count, not with the sides: the token count of each level
is (W / f) * (H / f). So a size is within a recorded size when it has no more pixels; for
``max_size`` its long side must not be longer either (the declared size is what the graphs were
checked and the engines are built for, in either orientation). The element counts also grow in
proportion to the batch, which is how a batch other than 1 or 2 is judged: the UNet at batch
``u >= 2`` is taken to fit where ``u * pixels <= 2 * pixels(max_batch2_size)`` (exact for the
per-token tensors up to the rounding of the chunk sizes).

Exports without recorded limits (older ones) are not limited here.
"""

from __future__ import annotations

from .contract import PipelineFacts
from .request import CFG_MODES, GenerationError


def _pixels(size: tuple[int, int]) -> int:
    return size[0] * size[1]


def within(size: tuple[int, int], width: int, height: int) -> bool:
    """``width x height`` has no more pixels and no longer side than ``size`` (either orientation)."""
    return width * height <= _pixels(size) and max(width, height) <= max(size)


def check_size(facts: PipelineFacts, width: int, height: int) -> None:
    """Refuse an image size beyond the export's ``max_size`` (one line, with the remedy)."""
    if facts.max_size is None or within(facts.max_size, width, height):
        return
    w, h = facts.max_size
    raise GenerationError(f"{width}x{height} is beyond this export's maximum size {w}x{h} (at most "
                          f"{w * h:,} pixels and a side of {max(w, h)}); re-export with linfusion-export "
                          f"--max-size {width}x{height} or ask for a smaller image")


def max_unet_batch(facts: PipelineFacts, width: int, height: int) -> int | None:
    """The largest UNet batch that keeps every tensor under the limit at this size: 0 beyond
    ``max_size``, 1 where only batch 1 fits, else ``2 * pixels(max_batch2_size) // pixels``.
    None when the export records no limits."""
    if facts.max_size is None:
        return None
    if not within(facts.max_size, width, height):
        return 0
    if facts.max_batch2_size is None:
        return 1
    return max(1, 2 * _pixels(facts.max_batch2_size) // (width * height))


def cfg_mode_for(facts: PipelineFacts, width: int, height: int, batch: int, requested: str) -> str:
    """The guidance mode to run: ``requested``, or "sequential" where the batched pass (the UNet
    at ``2 * batch``) would put a tensor above the limit. ``batch`` is the number of images per
    UNet pass of one guidance branch (prompts x images per prompt). Raises GenerationError when
    even the sequential pass (the UNet at ``batch``) cannot stay under the limit."""
    if requested not in CFG_MODES:
        raise GenerationError(f"cfg_mode must be one of {', '.join(CFG_MODES)}, got {requested!r}")
    fits = max_unet_batch(facts, width, height)
    if fits is None:
        return requested
    if batch > fits:
        if fits == 0:
            check_size(facts, width, height)
        raise GenerationError(f"{batch} images at once at {width}x{height} would put UNet tensors above "
                              f"this export's limit of {facts.tensor_limit:,} elements; generate at most "
                              f"{fits} at a time at this size")
    return requested if 2 * batch <= fits else "sequential"
