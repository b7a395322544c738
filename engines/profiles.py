"""Optimization profiles from a resolution range or a list of sizes, and a batch range.

Sizes are image pixels. Latent sides are pixels / vae_scale_factor and must be multiples of
the export's latent multiple. A side range wider than ``MAX_SIDE_RATIO`` is split into several
profiles, because TensorRT tunes kernels for each profile's opt shape and one very wide profile
serves its ends poorly. The profiles are nested (each starts at the smallest side and ends at
its piece's largest), so every height/width mix in the range has a profile. The UNet's batch range doubles for batched classifier-free guidance;
text encoders have a static sequence length and a batch range for positive + negative prompts.
Profiles are checked against the size limits the export records (``check_limits``): no profile
may reach beyond its ``max_size``. Where batched guidance would put a UNet tensor above the
export's tensor limit, the runtime runs guidance sequentially, so the UNet's batch range of that
profile stops at what fits (``linfusion.runtime.limits.max_unet_batch``). No TensorRT here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from linfusion.runtime.contract import UNET, Axis, BatchRule, ComponentKind, ComponentSpec, component_kind
from linfusion.runtime.engine_manifest import ProfileSpec
from linfusion.runtime.limits import max_unet_batch, within
from linfusion.runtime.manifest import Manifest

MAX_SIDE_RATIO = 2.0


class ProfileError(ValueError):
    """Sizes or batches that cannot make a valid profile."""


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ProfileError(f"need 1 <= min <= opt <= max, got {self.min}:{self.opt}:{self.max}")

    def scaled(self, factor: int) -> Range:
        return Range(self.min * factor, self.opt * factor, self.max * factor)


def parse_batch(text: str) -> Range:
    """``MIN:OPT:MAX`` (or a single N for a static batch)."""
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ProfileError(f"batch must be MIN:OPT:MAX integers, got {text!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise ProfileError(f"batch must be MIN:OPT:MAX, got {text!r}")
    return Range(*values)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``WxH,WxH,...`` -> [(width, height), ...]."""
    sizes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            w, h = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ProfileError(f"sizes must look like 1024x768, got {item!r}") from None
        if w <= 0 or h <= 0:
            raise ProfileError(f"size {item!r} must be positive")
        sizes.append((w, h))
    if not sizes:
        raise ProfileError("no sizes given")
    return sizes


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def split_side_range(side: Range, multiple: int, max_ratio: float = MAX_SIDE_RATIO) -> list[Range]:
    """Split [min, max] pixel sides into pieces with max/min <= max_ratio; each piece's opt is
    the requested opt when it falls inside, else the piece's geometric middle."""
    for name, value in (("min", side.min), ("opt", side.opt), ("max", side.max)):
        if value % multiple:
            raise ProfileError(f"{name} size {value} is not a multiple of {multiple} pixels")
    pieces = max(1, math.ceil(math.log(side.max / side.min) / math.log(max_ratio) - 1e-9))
    bounds = [side.min]
    for i in range(1, pieces):
        bounds.append(_round_to(side.min * (side.max / side.min) ** (i / pieces), multiple))
    bounds.append(side.max)
    ranges = []
    used = False
    for lo, hi in zip(bounds, bounds[1:]):
        if not used and lo <= side.opt <= hi:
            opt, used = side.opt, True
        else:
            opt = _round_to(math.sqrt(lo * hi), multiple)
        ranges.append(Range(lo, min(max(opt, lo), hi), hi))
    return ranges


@dataclass(frozen=True)
class SpatialProfile:
    """Pixel ranges for height and width of one profile."""
    height: Range
    width: Range


def spatial_profiles(multiple: int, min_size: int | None = None, opt_size: int | None = None,
                     max_size: int | None = None, sizes: list[tuple[int, int]] | None = None) -> list[SpatialProfile]:
    if sizes:
        for w, h in sizes:
            if w % multiple or h % multiple:
                raise ProfileError(f"size {w}x{h} is not a multiple of {multiple} pixels")
        return [SpatialProfile(Range(h, h, h), Range(w, w, w)) for w, h in dict.fromkeys(sizes)]
    side = Range(min_size, opt_size, max_size)
    # Every profile starts at the smallest side, so that any mix of height and width inside the
    # range (2048x512 too) fits the profile of its larger side; opt is tuned per piece.
    nested = [Range(side.min, r.opt, r.max) for r in split_side_range(side, multiple)]
    return [SpatialProfile(r, r) for r in nested]


def component_batch(kind: ComponentKind | str, batch: Range) -> Range:
    kind = component_kind(kind) if isinstance(kind, str) else kind
    if kind.batch_rule is BatchRule.CFG:  # batched CFG runs negative and positive together
        return Range(batch.min, batch.opt * 2, batch.max * 2)
    if kind.batch_rule is BatchRule.PROMPT_PAIR:
        return Range(1, batch.opt * 2, batch.max * 2)
    return batch


def component_profiles(manifest: Manifest, component: str, spatial: list[SpatialProfile],
                       batch: Range) -> list[ProfileSpec]:
    """The profiles of one component: one per spatial profile (text encoders: one, static)."""
    spec: ComponentSpec = manifest.components[component]
    factor = manifest.pipeline.vae_scale_factor
    uses_space = any(d in Axis.UNITS for t in spec.inputs for d in t.shape)
    profiles = []
    for sp in (spatial if uses_space else spatial[:1]):
        dims = {Axis.BATCH: _limited_batch(manifest, spec.kind, batch, sp)}
        for axis, unit in Axis.UNITS.items():
            pixels = sp.height if axis in Axis.VERTICAL else sp.width
            dims[axis] = _latent(pixels, factor) if unit == "latent" else pixels
        shapes = {}
        for tensor in spec.inputs:
            rows = [[], [], []]
            for d in tensor.shape:
                if isinstance(d, int):
                    values = (d, d, d)
                elif d in dims:
                    values = (dims[d].min, dims[d].opt, dims[d].max)
                elif Axis.resolve(d):  # a UNet level's side (ControlNet residuals): height_div4
                    base, divisor = Axis.resolve(d)
                    values = (dims[base].min // divisor, dims[base].opt // divisor, dims[base].max // divisor)
                else:
                    raise ProfileError(f"{component}: input '{tensor.name}' has an unknown dynamic axis '{d}'")
                for row, value in zip(rows, values):
                    row.append(value)
            shapes[tensor.name] = rows
        profiles.append(ProfileSpec(shapes))
    return profiles


def _latent(pixels: Range, factor: int) -> Range:
    return Range(pixels.min // factor, pixels.opt // factor, pixels.max // factor)


def largest_square_side(manifest: Manifest) -> int | None:
    """The longest side of a square within the export's ``max_size`` (a multiple of the pixel
    multiple), or None when the export records no max size."""
    size = manifest.pipeline.max_size
    if size is None:
        return None
    multiple = manifest.pixel_multiple
    side = math.isqrt(size[0] * size[1]) // multiple * multiple
    return min(side, max(size))


def _limited_batch(manifest: Manifest, kind: str, batch: Range, sp: SpatialProfile) -> Range:
    """The component's batch range; the UNet's stops where its tensors would exceed the limit."""
    comp_batch = component_batch(kind, batch)
    fits = max_unet_batch(manifest.pipeline, sp.width.max, sp.height.max)
    if component_kind(kind).batch_rule is not BatchRule.CFG or fits is None or comp_batch.max <= fits:
        return comp_batch
    top = max(fits, comp_batch.min)
    return Range(comp_batch.min, min(comp_batch.opt, top), top)


def check_limits(manifest: Manifest, spatial: list[SpatialProfile], batch: Range) -> None:
    """Refuse a profile whose largest shape is beyond the export's ``max_size``, or whose batch
    cannot run the UNet even with sequential guidance there without exceeding the tensor limit."""
    facts = manifest.pipeline
    if facts.max_size is None:
        return
    max_w, max_h = facts.max_size
    for sp in spatial:
        width, height = sp.width.max, sp.height.max
        if not within(facts.max_size, width, height):
            raise ProfileError(f"a profile up to {width}x{height} is beyond this export's maximum size {max_w}x{max_h} "
                               f"(at most {max_w * max_h:,} pixels and a side of {max(max_w, max_h)}); build smaller "
                               f"sizes or re-export with linfusion-export --max-size {width}x{height}")
        fits = max_unet_batch(facts, width, height)
        if UNET.name in manifest.components and batch.max > fits:
            raise ProfileError(f"--batch max {batch.max} at {width}x{height} puts UNet tensors above this export's "
                               f"limit of {facts.tensor_limit:,} elements even with sequential guidance; at this "
                               f"size at most {fits} fit, so lower --batch or the size")
