"""What gets checked: one case per component, image size, batch and (for the UNet) timestep.

Sizes are image pixels written WIDTHxHEIGHT, as in ``linfusion-build``; each component sees
them in its own units (latents for the UNet and VAE decoder, pixels for the VAE encoder). The
UNet runs early, middle and late in the noise schedule because errors differ across it.
Torch-free: the inputs themselves are made by the reference side or read from a file.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Any

from linfusion.runtime.contract import Role, component_kind
from linfusion.runtime.manifest import Manifest

STAGES = ("early", "middle", "late")


class CaseError(ValueError):
    """A size, batch or component request that this export cannot check."""


@dataclass(frozen=True)
class Case:
    component: str
    batch: int
    size: tuple[int, int] | None
    """(width, height) in pixels; None for text encoders, whose shape has no spatial axes."""
    timestep: float | None = None
    stage: str | None = None

    @property
    def id(self) -> str:
        where = f"@{self.size[0]}x{self.size[1]}" if self.size else ""
        when = f"/t{self.timestep:g}" if self.timestep is not None else ""
        return f"{self.component}{where}/b{self.batch}{when}"

    @property
    def input_key(self) -> str:
        """Cases that differ only in timestep share their random inputs."""
        where = f"@{self.size[0]}x{self.size[1]}" if self.size else ""
        return f"{self.component}{where}/b{self.batch}"

    def seed(self, base: int) -> int:
        return (base * 1_000_003 + zlib.crc32(self.input_key.encode())) % (2**31)

    def component_size(self, vae_factor: int) -> tuple[int, int]:
        """(height, width) in the component's own units."""
        if self.size is None:
            return (1, 1)
        width, height = self.size
        if component_kind(self.component).spatial == "image":
            return (height, width)
        return (height // vae_factor, width // vae_factor)

    def label(self) -> str:
        parts = [f"{self.size[0]}x{self.size[1]}" if self.size else "-", f"b{self.batch}"]
        if self.timestep is not None:
            parts.append(f"t={self.timestep:g} ({self.stage})")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "id": self.id}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Case:
        size = tuple(data["size"]) if data.get("size") else None
        return cls(data["component"], int(data["batch"]), size, data.get("timestep"), data.get("stage"))


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``WxH,WxH`` -> [(width, height), ...]; a clear error for anything else."""
    sizes = []
    for item in (s.strip() for s in text.split(",")):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise CaseError(f"bad size '{item}': write WIDTHxHEIGHT in pixels, e.g. 512x768")
        width, height = (int(p) for p in parts)
        if width <= 0 or height <= 0:
            raise CaseError(f"bad size '{item}': width and height must be positive")
        sizes.append((width, height))
    return sizes


def check_sizes(sizes: list[tuple[int, int]], manifest: Manifest) -> None:
    multiple = manifest.pixel_multiple
    for width, height in sizes:
        if width % multiple or height % multiple:
            raise CaseError(f"size {width}x{height} is not a multiple of {multiple} pixels "
                            f"(latent multiple {manifest.latent_multiple} x VAE factor "
                            f"{manifest.pipeline.vae_scale_factor}) in both sides")


def default_sizes(manifest: Manifest) -> list[tuple[int, int]]:
    """The model's native square size and a non-square one, so a frozen shape shows up."""
    side, multiple = manifest.pipeline.default_size, manifest.pixel_multiple
    side = max(side - side % multiple, multiple)
    other = (side + multiple, max((side // 2) - (side // 2) % multiple, multiple))
    return [(side, side), other]


def check_components(names: list[str], manifest: Manifest) -> None:
    unknown = [n for n in names if n not in manifest.components]
    if unknown:
        raise CaseError(f"unknown component(s) {', '.join(unknown)}; this export has "
                        f"{', '.join(manifest.components)}")


def unet_timesteps(num_train_timesteps: int = 1000) -> list[tuple[str, float]]:
    """Early (pure noise), middle and late (nearly clean) points of the training schedule."""
    last = num_train_timesteps - 1
    return [("early", float(last)), ("middle", float(num_train_timesteps // 2)),
            ("late", float(max(num_train_timesteps // 50, 1)))]


def plan(manifest: Manifest, components: list[str], sizes: list[tuple[int, int]], batch: int,
         num_train_timesteps: int = 1000) -> list[Case]:
    """Every case, component by component in the manifest's order."""
    if batch < 1:
        raise CaseError(f"batch must be at least 1, got {batch}")
    cases: list[Case] = []
    for name in (n for n in manifest.components if n in components):
        kind = component_kind(manifest.components[name].kind)
        if kind.spatial is None:
            cases.append(Case(name, batch, None))
            continue
        for size in sizes:
            if kind.role is Role.DENOISER:
                cases += [Case(name, batch, size, t, stage) for stage, t in unet_timesteps(num_train_timesteps)]
            else:
                cases.append(Case(name, batch, size))
    return cases
