"""The engine manifest (``<export>/engines/engines.json``): what ``linfusion-build`` built.

Owned by the runtime (the bottom layer): the engine builder writes it, the TensorRT backend
reads it. It records the TensorRT version and GPU an engine was built for, so that loading
it elsewhere is refused with a clear message instead of failing inside TensorRT, plus each
engine's optimization profiles, precision, plugin use and the sha256 of its source ONNX file
and of the engine itself. Pure Python: no TensorRT, no CUDA.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .manifest import check_format, sha256_file

ENGINES_DIR = "engines"
ENGINE_MANIFEST_NAME = "engines.json"
ENGINE_FORMAT = "linfusion-engines"
ENGINE_FORMAT_VERSION = 1


class EngineManifestError(ValueError):
    """A missing, corrupt or incompatible engine directory."""


@dataclass
class ProfileSpec:
    """One optimization profile: input name -> [min, opt, max] shapes."""
    shapes: dict[str, list[list[int]]]

    def contains(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        for name, shape in shapes.items():
            bounds = self.shapes.get(name)
            if bounds is None:
                continue
            low, _, high = bounds
            if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
                return False
        return True

    def describe(self) -> str:
        return "; ".join(f"{name} {tuple(lo)}..{tuple(hi)}" for name, (lo, _, hi) in self.shapes.items())


@dataclass
class EngineSpec:
    engine: str
    """The serialized engine, relative to the engines directory."""
    engine_sha256: str
    onnx: str
    """The source ONNX file, relative to the export directory."""
    onnx_sha256: str
    precision: str
    profiles: list[ProfileSpec]
    plugin: bool = False
    linear_attention_nodes: int = 0
    build_seconds: float = 0.0
    refittable: bool = False
    optimization_level: int = 3

    def profile_index(self, shapes: dict[str, tuple[int, ...]]) -> int | None:
        """The first profile that admits these input shapes, else None."""
        return next((i for i, p in enumerate(self.profiles) if p.contains(shapes)), None)


@dataclass
class EngineManifest:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    """"major.minor", e.g. "9.0"."""
    components: dict[str, EngineSpec]
    plugin: dict[str, Any] = field(default_factory=dict)
    """name(s), version, namespace, enabled, kernel compiler."""
    tools: dict[str, str] = field(default_factory=dict)
    format: str = ENGINE_FORMAT
    format_version: int = ENGINE_FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineManifest:
        check_format(data, ENGINE_FORMAT, ENGINE_FORMAT_VERSION, "engine manifest", "rebuild the engines",
                     EngineManifestError)
        try:
            components = {name: EngineSpec(**{**spec, "profiles": [ProfileSpec(**p) for p in spec["profiles"]]})
                          for name, spec in data["components"].items()}
            return cls(**{**data, "components": components})
        except (KeyError, TypeError) as exc:
            raise EngineManifestError(f"malformed engine manifest: {exc}") from exc

    def check_compatible(self, tensorrt_version: str, gpu_name: str, compute_capability: str) -> None:
        """Refuse engines built for another TensorRT version or GPU (engines are not portable)."""
        if _major_minor_patch(tensorrt_version) != _major_minor_patch(self.tensorrt_version):
            raise EngineManifestError(
                f"these engines were built with TensorRT {self.tensorrt_version}, but TensorRT {tensorrt_version} "
                f"is installed; rebuild them with `linfusion-build` or install TensorRT {self.tensorrt_version}")
        if compute_capability != self.compute_capability or gpu_name != self.gpu_name:
            raise EngineManifestError(
                f"these engines were built for {self.gpu_name} (compute capability {self.compute_capability}), "
                f"but this GPU is {gpu_name} (compute capability {compute_capability}); rebuild them on this GPU "
                f"with `linfusion-build`")


def _major_minor_patch(version: str) -> tuple[str, ...]:
    """TensorRT engines are tied to the exact version; the build number (4th part) is ignored."""
    return tuple(version.split(".")[:3])


def engines_dir(export_dir: str | Path) -> Path:
    return Path(export_dir) / ENGINES_DIR


def load_engine_manifest(directory: str | Path, verify: bool = False) -> EngineManifest:
    """Read ``engines.json`` from an engines directory; with ``verify``, check every engine's sha256."""
    directory = Path(directory)
    path = directory / ENGINE_MANIFEST_NAME
    if not path.is_file():
        raise EngineManifestError(f"{directory} has no {ENGINE_MANIFEST_NAME}: build engines with `linfusion-build`")
    try:
        manifest = EngineManifest.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise EngineManifestError(f"{path} is corrupt: {exc}") from exc
    if verify:
        for name, spec in manifest.components.items():
            engine = directory / spec.engine
            if not engine.is_file():
                raise EngineManifestError(f"{directory}: engine for {name} ({spec.engine}) is missing")
            if sha256_file(engine) != spec.engine_sha256:
                raise EngineManifestError(f"{directory}: checksum mismatch for {spec.engine}; rebuild the engines")
    return manifest
