"""The export directory's manifest (``linfusion.json``): the contract between export, engines and runtime.

The runtime owns this schema because it is the bottom layer: the exporter writes it, the
engine builder and the runtime read it, and both refuse a directory whose files no longer
match the recorded sha256.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "linfusion.json"
FORMAT_NAME = "linfusion-export"
FORMAT_VERSION = 1
LINEAR_ATTENTION_DOMAIN = "linfusion"
LINEAR_ATTENTION_OP = "LinearAttention"


class ManifestError(ValueError):
    """A missing, corrupt, incompatible or tampered export directory."""


@dataclass
class TensorSpec:
    name: str
    dtype: str
    """numpy dtype name: float32, float16, int64 ..."""
    shape: list[int | str]
    """Static sizes as ints, dynamic axes by name (batch, height, width ...)."""


@dataclass
class ComponentSpec:
    path: str
    """The ONNX file, relative to the export directory."""
    precision: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data: str | None = None
    linear_attention_nodes: int = 0

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)


@dataclass
class Manifest:
    source: dict[str, Any]
    precision: str
    opset: int
    pipeline: dict[str, Any]
    """Pipeline facts the runtime needs: kind (sd | sdxl), vae_scale_factor, vae_scaling_factor,
    latent_channels, latent_multiple, force_zeros_for_empty_prompt, ..."""
    components: dict[str, ComponentSpec]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def latent_multiple(self) -> int:
        return int(self.pipeline["latent_multiple"])

    @property
    def pixel_multiple(self) -> int:
        """Image sizes must be multiples of this: the UNet's latent multiple times the VAE factor."""
        return self.latent_multiple * int(self.pipeline["vae_scale_factor"])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        check_format(data, FORMAT_NAME, FORMAT_VERSION, "export manifest", "re-export the model", ManifestError)
        try:
            components = {
                name: ComponentSpec(**{**spec, "inputs": [TensorSpec(**t) for t in spec["inputs"]],
                                       "outputs": [TensorSpec(**t) for t in spec["outputs"]]})
                for name, spec in data["components"].items()}
            return cls(**{**data, "components": components})
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"malformed manifest: {exc}") from exc


def check_format(data: dict[str, Any], name: str, version: int, what: str, remedy: str,
                 error: type[Exception]) -> None:
    """Refuse a document of another format or version, saying what to do about it."""
    if data.get("format") != name:
        raise error(f"not a LinFusion {what} (format={data.get('format')!r})")
    if data.get("format_version") != version:
        raise error(f"{what} format version {data.get('format_version')} is not supported "
                    f"(this runtime reads version {version}); {remedy}")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``directory`` except the manifest itself."""
    return {path.relative_to(directory).as_posix(): {"sha256": sha256_file(path), "size": path.stat().st_size}
            for path in sorted(directory.rglob("*"))
            if path.is_file() and path.name != MANIFEST_NAME}


def load_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """Read ``linfusion.json``; with ``verify``, check every recorded file's size and sha256."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ManifestError(f"export directory not found: {directory}")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{directory} is not an export directory: it has no {MANIFEST_NAME}")
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is corrupt: {exc}") from exc
    if verify:
        verify_files(directory, manifest)
    return manifest


def verify_files(directory: Path, manifest: Manifest) -> None:
    for name, record in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise ManifestError(f"{directory}: {name} is missing")
        if path.stat().st_size != record["size"] or sha256_file(path) != record["sha256"]:
            raise ManifestError(f"{directory}: checksum mismatch for {name}; the file was changed "
                                f"or damaged after export")
