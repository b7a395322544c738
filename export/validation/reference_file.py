"""Reference inputs and outputs saved on a machine with PyTorch, compared on one without.

Arrays go to ``FILE.npz`` (plain ``np.savez``, loadable without pickle); ``FILE.json`` beside it
holds what the arrays mean: the export they were made for (source, precision and the manifest's
recorded sha256 of each ONNX file), the settings, and the cases. A reference made for one export
is refused for another. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from linfusion.runtime.manifest import Manifest

from .cases import Case

FORMAT = "linfusion-validation-reference"
FORMAT_VERSION = 1
SEP = "|"


class ReferenceFileError(ValueError):
    """A missing, corrupt, or mismatched reference file."""


@dataclass
class CaseData:
    case: Case
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    """Attention-core outputs in call order (UNet cases), for localising a failure."""


@dataclass
class ReferenceData:
    identity: dict[str, Any]
    settings: dict[str, Any]
    cases: list[CaseData]
    end_to_end: dict[str, Any] | None = None
    """Settings, initial latents and the reference image of the end-to-end check."""


def paths(file: str | Path) -> tuple[Path, Path]:
    """``ref`` or ``ref.npz`` or ``ref.json`` -> (ref.npz, ref.json)."""
    file = Path(file)
    stem = file.with_suffix("") if file.suffix in (".npz", ".json") else file
    return stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")


def export_identity(manifest: Manifest) -> dict[str, Any]:
    """What must match between the export a reference was made for and the one being validated."""
    onnx_files = {spec.path for spec in manifest.components.values()}
    onnx_files |= {spec.external_data for spec in manifest.components.values() if spec.external_data}
    return {"source": manifest.source, "precision": manifest.precision,
            "components": {name: spec.precision for name, spec in manifest.components.items()},
            "sha256": {path: manifest.files.get(path, {}).get("sha256") for path in sorted(onnx_files)}}


def check_identity(reference: ReferenceData, manifest: Manifest, file: str | Path) -> None:
    current = export_identity(manifest)
    saved = reference.identity
    if saved.get("precision") != current["precision"]:
        raise ReferenceFileError(f"{file} was made for a {saved.get('precision')} export, this one is "
                                 f"{current['precision']}")
    for path, digest in saved.get("sha256", {}).items():
        if path in current["sha256"] and current["sha256"][path] != digest:
            raise ReferenceFileError(f"{file} was made for another export: {path} has sha256 "
                                     f"{str(current['sha256'][path])[:12]}..., the reference expects {str(digest)[:12]}...")
    missing = [c.case.component for c in reference.cases if c.case.component not in manifest.components]
    if missing:
        raise ReferenceFileError(f"{file} has cases for {', '.join(sorted(set(missing)))}, which this export lacks")


def save(file: str | Path, reference: ReferenceData) -> tuple[Path, Path]:
    npz, sidecar = paths(file)
    npz.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    cases = []
    for index, data in enumerate(reference.cases):
        for kind, group in (("in", data.inputs), ("out", data.outputs), ("layer", data.layers)):
            for name, array in group.items():
                arrays[SEP.join((str(index), kind, name))] = np.asarray(array)
        cases.append({**data.case.to_dict(), "inputs": list(data.inputs), "outputs": list(data.outputs),
                      "layers": list(data.layers)})
    end_to_end = None
    if reference.end_to_end is not None:
        end_to_end = {k: v for k, v in reference.end_to_end.items() if not isinstance(v, np.ndarray)}
        for key, value in reference.end_to_end.items():
            if isinstance(value, np.ndarray):
                arrays[SEP.join(("e2e", key))] = value
    with open(npz, "wb") as handle:
        np.savez(handle, **arrays)
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "arrays": npz.name,
                "identity": reference.identity, "settings": reference.settings, "cases": cases,
                "end_to_end": end_to_end}
    sidecar.write_text(json.dumps(document, indent=2) + "\n")
    return npz, sidecar


def load(file: str | Path) -> ReferenceData:
    npz, sidecar = paths(file)
    for path in (sidecar, npz):
        if not path.is_file():
            raise ReferenceFileError(f"reference file not found: {path}")
    try:
        document = json.loads(sidecar.read_text())
    except json.JSONDecodeError as exc:
        raise ReferenceFileError(f"{sidecar} is corrupt: {exc}") from exc
    if document.get("format") != FORMAT or document.get("format_version") != FORMAT_VERSION:
        raise ReferenceFileError(f"{sidecar} is not a linfusion-validate reference (format "
                                 f"{document.get('format')!r} version {document.get('format_version')!r})")
    try:
        arrays = np.load(npz, allow_pickle=False)
        cases = []
        for index, entry in enumerate(document["cases"]):
            def group(kind: str, names: list[str], i: int = index) -> dict[str, np.ndarray]:
                return {name: arrays[SEP.join((str(i), kind, name))] for name in names}
            cases.append(CaseData(Case.from_dict(entry), group("in", entry["inputs"]),
                                  group("out", entry["outputs"]), group("layer", entry["layers"])))
        end_to_end = document.get("end_to_end")
        if end_to_end is not None:
            end_to_end = {**end_to_end, **{key.split(SEP, 1)[1]: arrays[key] for key in arrays.files
                                           if key.startswith("e2e" + SEP)}}
    except (KeyError, ValueError, OSError) as exc:
        raise ReferenceFileError(f"{npz} does not match {sidecar.name}: {exc}") from exc
    return ReferenceData(document["identity"], document["settings"], cases, end_to_end)
