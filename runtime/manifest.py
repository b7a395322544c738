"""The export directory's manifest (``linfusion.json``): serialising the contract, checking it.

The runtime owns this schema because it is the bottom layer: the exporter writes it, the
engine builder, the validator and the runtime read it. The types live in ``.contract``.

Integrity: the manifest carries the sha256 of every other file and, from format 2 on, a sha256
of its own canonical content (``manifest_sha256``), so an edited manifest is refused like an
edited model file. Format 1 manifests (no self-checksum, untyped pipeline facts) are migrated
on read.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .contract import ComponentSpec, PipelineFacts, TensorSpec, ops

MANIFEST_NAME = "linfusion.json"
FORMAT_NAME = "linfusion-export"
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
DIGEST_KEY = "manifest_sha256"
# Kept for callers of format 1's names.
LINEAR_ATTENTION_DOMAIN = ops.DOMAIN
LINEAR_ATTENTION_OP = ops.LINEAR_ATTENTION


class ManifestError(ValueError):
    """A missing, corrupt, incompatible or tampered export directory."""


@dataclass(frozen=True)
class Manifest:
    source: dict[str, Any]
    precision: str
    opset: int
    pipeline: PipelineFacts
    components: dict[str, ComponentSpec]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    loras: list[dict[str, Any]] = field(default_factory=list)
    """LoRAs fused at export (``linfusion-export --lora``): file, sha256, scale, tensors applied per component."""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def latent_multiple(self) -> int:
        return self.pipeline.latent_multiple

    @property
    def pixel_multiple(self) -> int:
        """Image sizes must be multiples of this: the UNet's latent multiple times the VAE factor."""
        return self.pipeline.pixel_multiple

    def with_files(self, files: dict[str, dict[str, Any]]) -> Manifest:
        return replace(self, files=files)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["format_version"] = FORMAT_VERSION
        data[DIGEST_KEY] = content_digest(data)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], check_digest: bool = True) -> Manifest:
        """Parse (and migrate) a manifest document; refuses a document whose self-checksum fails."""
        check_format(data, FORMAT_NAME, READABLE_VERSIONS, "export manifest", "re-export the model", ManifestError)
        data = dict(data)
        if data["format_version"] == 1:
            data = migrate_v1(data)
        else:
            recorded = data.pop(DIGEST_KEY, None)
            if check_digest and recorded != content_digest(data):
                raise ManifestError(f"{MANIFEST_NAME} was changed after export (its {DIGEST_KEY} does not match its "
                                    f"content); re-export the model rather than editing the manifest")
        try:
            components = {name: _component(spec) for name, spec in data["components"].items()}
            return cls(**{**data, "pipeline": PipelineFacts.from_dict(data["pipeline"]),
                          "components": components})
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"malformed manifest: {exc}") from exc


def _component(spec: dict[str, Any]) -> ComponentSpec:
    return ComponentSpec(**{**spec, "inputs": tuple(TensorSpec(**t) for t in spec["inputs"]),
                            "outputs": tuple(TensorSpec(**t) for t in spec["outputs"])})


def content_digest(data: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a manifest document without its own digest."""
    body = {k: v for k, v in data.items() if k != DIGEST_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def migrate_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: components gain their kind (format 1 named them by kind), the pipeline facts
    become typed (the architecture widths format 1 lacks stay unknown). Format 1 has no
    self-checksum, so its manifest cannot be checked: say so once."""
    warnings.warn(f"this export was written by an older linfusion-export (manifest format 1): {MANIFEST_NAME} "
                  f"itself is not checksummed; re-export to protect it", stacklevel=3)
    components = {name: {"kind": name, **spec} for name, spec in data.get("components", {}).items()}
    data = {k: v for k, v in data.items() if k != DIGEST_KEY}
    return {**data, "components": components, "format_version": FORMAT_VERSION}


def check_format(data: dict[str, Any], name: str, versions: int | tuple[int, ...], what: str, remedy: str,
                 error: type[Exception]) -> None:
    """Refuse a document of another format or version, saying what to do about it."""
    versions = (versions,) if isinstance(versions, int) else versions
    if not isinstance(data, dict) or data.get("format") != name:
        raise error(f"not a LinFusion {what} (format={data.get('format') if isinstance(data, dict) else None!r})")
    if data.get("format_version") not in versions:
        raise error(f"{what} format version {data.get('format_version')} is not supported "
                    f"(this runtime reads version {'/'.join(map(str, versions))}); {remedy}")


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


def check_files(directory: Path, manifest: Manifest, hashes: bool = True) -> dict[str, str]:
    """Every recorded file that is missing, of another size or (with ``hashes``) of another sha256,
    mapped to what is wrong with it."""
    problems = {}
    for name, record in manifest.files.items():
        path = Path(directory) / name
        if not path.is_file():
            problems[name] = "missing"
        elif path.stat().st_size != record["size"]:
            problems[name] = f"{path.stat().st_size} bytes, {record['size']} recorded"
        elif hashes and sha256_file(path) != record["sha256"]:
            problems[name] = "checksum mismatch"
    return problems


def load_manifest(directory: str | Path, verify: bool = True, files: bool = True) -> Manifest:
    """Read and check ``linfusion.json``. The manifest's own checksum is always checked, the presence
    and the size of every recorded file unless ``files`` is False (for a caller that reports file
    problems itself, like ``linfusion-validate --checksums report``); ``verify`` adds the sha256."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ManifestError(f"export directory not found: {directory}")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{directory} is not an export directory: it has no {MANIFEST_NAME}")
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is corrupt: {exc}") from exc
    if files:
        verify_files(directory, manifest, hashes=verify)
    return manifest


def verify_files(directory: Path, manifest: Manifest, hashes: bool = True) -> None:
    problems = check_files(directory, manifest, hashes)
    if problems:
        name, problem = next(iter(problems.items()))
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        if problem == "missing":
            raise ManifestError(f"{directory}: {name} is missing{more}; re-export the model")
        raise ManifestError(f"{directory}: checksum mismatch for {name} ({problem}){more}: the file was changed "
                            f"or damaged after export; re-export the model")
