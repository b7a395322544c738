"""One validation run: reference, backends, comparison, localisation, end to end.

The reference is either PyTorch (rebuilt from the manifest's source, or ``--reference``) or a
file saved earlier by ``--save-reference``; in the second case nothing here imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from linfusion.runtime.manifest import Manifest, ManifestError, check_files, load_manifest

from . import reference_file
from .targets import BACKENDS, OnnxRuntimeTarget, TensorRTTarget, backend_status
from .cases import CaseError, check_components, check_sizes, default_sizes, plan
from .end_to_end import (
    EndToEndResult,
    EndToEndSettings,
    case_for,
    compare_images,
    diffusers_image,
    runtime_image,
)
from .localize import localise
from .reference_file import CaseData, ReferenceData, ReferenceFileError
from .report import CheckResult, ValidationReport
from ..comparison import IMAGE_TOLERANCES, TOLERANCES, compare_outputs, tolerance_for

CHECKSUM_MODES = ("verify", "report", "skip")
LAYER_BYTES_LIMIT = 512 << 20
"""Attention-layer outputs saved with a reference, for localising on the torch-free side."""


class ValidationInputError(ValueError):
    """A request that cannot be validated; the message is one line."""


@dataclass
class Options:
    export_dir: Path
    backends: list[str] | None = None
    """None: both (TensorRT reported as skipped where it cannot run); with --save-reference, none."""
    sizes: list[tuple[int, int]] | None = None
    batch: int | None = None
    components: list[str] | None = None
    reference_model: str | None = None
    linfusion: str | None = None
    random_weights: bool | None = None
    end_to_end: bool = False
    save_reference: Path | None = None
    load_reference: Path | None = None
    checksums: str = "verify"
    providers: list[str] | None = None
    seed: int = 0


@dataclass
class _Reference:
    """The reference side of a run, however it was obtained."""

    cases: list[CaseData]
    describe: dict[str, Any]
    torch: Any = None
    end_to_end: dict[str, Any] | None = None


def validate(options: Options, progress: Callable[[str], None] = print) -> ValidationReport:
    export_dir = Path(options.export_dir)
    try:
        manifest = load_manifest(export_dir, verify=False, files=False)
    except ManifestError as exc:
        raise ValidationInputError(str(exc)) from exc
    checksums = _checksums(export_dir, manifest, options.checksums)
    components = options.components or list(manifest.components)
    sizes = options.sizes or default_sizes(manifest)
    try:
        check_components(components, manifest)
        check_sizes(sizes, manifest)
    except CaseError as exc:
        raise ValidationInputError(str(exc)) from exc
    saving = options.save_reference is not None
    backends = options.backends if options.backends is not None else ([] if saving else list(BACKENDS))

    if options.load_reference is not None:
        reference = _load_reference(options, manifest, components)
    else:
        reference = _torch_reference(options, manifest, export_dir, components, sizes, progress)
    cases = [data.case for data in reference.cases]
    settings = {"components": sorted({c.component for c in cases}, key=list(manifest.components).index),
                "sizes": [list(s) for s in sorted({c.size for c in cases if c.size})],
                "batch": cases[0].batch if cases else options.batch, "seed": options.seed,
                "timesteps": sorted({c.timestep for c in cases if c.timestep is not None}),
                "backends": backends, "end_to_end": options.end_to_end}
    report = ValidationReport(str(export_dir), manifest.precision, reference.describe, settings,
                              {p: t.to_dict() for p, t in TOLERANCES.items()}, checksums=checksums)
    if saving:
        report.saved_reference = [str(p) for p in reference_file.save(options.save_reference, ReferenceData(
            reference_file.export_identity(manifest), settings, reference.cases, reference.end_to_end))]
        progress(f"reference saved: {', '.join(report.saved_reference)}")

    for name in backends:
        status = backend_status(name, export_dir)
        report.backends.append(status)
        if not status.available:
            progress(f"{name}: skipped ({status.reason})")
            continue
        backend = (OnnxRuntimeTarget(export_dir, manifest, options.providers) if name == "onnxruntime"
                   else TensorRTTarget(export_dir, manifest))
        for component in settings["components"]:
            _check_component(report, backend, manifest, component, reference, export_dir, options, progress)
        if options.end_to_end:
            _end_to_end(report, name, export_dir, manifest, reference, options, progress)
    return report


def _check_component(report: ValidationReport, backend, manifest: Manifest, component: str,
                     reference: _Reference, export_dir: Path, options: Options,
                     progress: Callable[[str], None]) -> None:
    data = [d for d in reference.cases if d.case.component == component]
    tolerance = tolerance_for(manifest.components[component].precision)
    progress(f"{component} on {backend.name}: {len(data)} case(s) ...")
    try:
        outcomes = backend.run(component, [d.inputs for d in data])
    except Exception as exc:  # noqa: BLE001 - a backend that cannot load or run the model is reported
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        report.checks += [CheckResult(component, backend.name, d.case.id, d.case.label(), "error", reason=message)
                          for d in data]
        return
    first_failure = None
    for d, outcome in zip(data, outcomes):
        if isinstance(outcome, str):
            report.checks.append(CheckResult(component, backend.name, d.case.id, d.case.label(), "skipped",
                                             reason=outcome))
            continue
        missing = [n for n in d.outputs if n not in outcome]
        if missing:
            report.checks.append(CheckResult(component, backend.name, d.case.id, d.case.label(), "failed",
                                             reason=f"the model lacks output(s) {', '.join(missing)}"))
            continue
        metrics = compare_outputs(d.outputs, outcome, tolerance, names=list(d.outputs))
        passed = all(m.passed for m in metrics)
        report.checks.append(CheckResult(component, backend.name, d.case.id, d.case.label(),
                                         "passed" if passed else "failed", metrics))
        if not passed and first_failure is None:
            first_failure = d
    if first_failure is not None and manifest.components[component].linear_attention_nodes:
        progress(f"{component} on {backend.name}: failed; localising the first diverging attention layer ...")
        layers = first_failure.layers or _torch_layers(reference, first_failure)
        found = localise(component, backend.name, first_failure.case.id, export_dir / manifest.components[component].path,
                         first_failure.inputs, layers, tolerance,
                         options.providers or ["CPUExecutionProvider"])
        if backend.name != "onnxruntime":
            found.note = (found.note + "; " if found.note else "") + "layers compared with ONNX Runtime on the ONNX file"
        report.localisations.append(found)


def _torch_layers(reference: _Reference, data: CaseData) -> dict:
    if reference.torch is None:
        return {}
    return reference.torch.attention_outputs(data.case, data.inputs)


def _end_to_end(report: ValidationReport, backend: str, export_dir: Path, manifest: Manifest,
                reference: _Reference, options: Options, progress: Callable[[str], None]) -> None:
    e2e = reference.end_to_end
    if e2e is None:
        raise ValidationInputError("the reference file has no end-to-end image; save it with --end-to-end")
    try:
        settings = EndToEndSettings(**e2e["settings"])
        case = case_for(manifest)
    except (TypeError, ValueError) as exc:
        raise ValidationInputError(f"end-to-end: {exc}") from None
    if settings.case != case:
        raise ValidationInputError(f"the reference's end-to-end image is {settings.case} but this export's "
                                   f"UNet needs {case}; save the reference again with --end-to-end")
    label = " (inpainting)" if settings.inpainting else ""
    progress(f"end-to-end on {backend}{label}: {settings.width}x{settings.height}, {settings.steps} steps ...")
    tolerance = IMAGE_TOLERANCES[manifest.precision]
    try:
        image = runtime_image(export_dir, backend, settings, e2e["latents"], options.providers)
    except Exception as exc:  # noqa: BLE001 - the runtime could not generate: a failed check, not a crash
        report.end_to_end.append(EndToEndResult(backend, (settings.width, settings.height), settings.steps,
                                                settings.scheduler, 0.0, 255, False, tolerance.to_dict(),
                                                str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc),
                                                settings.case))
        return
    report.end_to_end.append(compare_images(backend, settings, image, e2e["image"], tolerance))


def _load_reference(options: Options, manifest: Manifest, components: list[str]) -> _Reference:
    if options.reference_model is not None:
        raise ValidationInputError("--reference and --load-reference exclude each other: the file is the reference")
    try:
        data = reference_file.load(options.load_reference)
        reference_file.check_identity(data, manifest, options.load_reference)
    except ReferenceFileError as exc:
        raise ValidationInputError(str(exc)) from exc
    cases = data.cases
    if options.components:
        have = {c.case.component for c in cases}
        absent = [c for c in options.components if c not in have]
        if absent:
            raise ValidationInputError(f"{options.load_reference} has no cases for {', '.join(absent)}")
        cases = [c for c in cases if c.case.component in options.components]
    if options.sizes:
        saved = {c.case.size for c in cases if c.case.size}
        if saved and set(options.sizes) != saved:
            raise ValidationInputError(f"{options.load_reference} holds sizes "
                                       f"{', '.join(f'{w}x{h}' for w, h in sorted(saved))}; --sizes asks for others")
    if options.batch is not None and any(c.case.batch != options.batch for c in cases):
        raise ValidationInputError(f"{options.load_reference} holds batch {cases[0].case.batch}, not {options.batch}")
    if options.end_to_end and data.end_to_end is None:
        raise ValidationInputError(f"{options.load_reference} has no end-to-end image; save it with --end-to-end")
    return _Reference(cases, {"kind": "file", "file": str(options.load_reference),
                              "identity": data.identity}, end_to_end=data.end_to_end)


def _torch_reference(options: Options, manifest: Manifest, export_dir: Path, components: list[str],
                     sizes: list[tuple[int, int]], progress: Callable[[str], None]) -> _Reference:
    try:
        from .torch_reference import ReferenceSource, TorchReference
    except ImportError as exc:
        raise ValidationInputError(f"the PyTorch reference needs torch and diffusers ({exc}); on a machine "
                                   f"without them, pass --load-reference FILE saved with --save-reference") from exc
    from linfusion.hub import ModelSourceError
    from linfusion.mount import CheckpointMismatchError

    source = ReferenceSource.from_manifest(manifest, options.reference_model, options.linfusion,
                                           options.random_weights)
    progress(f"loading the PyTorch reference {source.model} ...")
    try:
        torch_ref = TorchReference(manifest, source, components)
        cases = plan(manifest, components, sizes, options.batch or 2, _train_timesteps(export_dir))
    except (ModelSourceError, CheckpointMismatchError, CaseError) as exc:
        raise ValidationInputError(str(exc)) from exc
    factor = manifest.pipeline.vae_scale_factor
    data: list[CaseData] = []
    layer_bytes = 0
    for case in cases:
        progress(f"reference {case.id} ...")
        feed = torch_ref.inputs(case, options.seed, factor)
        entry = CaseData(case, feed, torch_ref.outputs(case, feed))
        if options.save_reference is not None and manifest.components[case.component].linear_attention_nodes \
                and layer_bytes < LAYER_BYTES_LIMIT:
            entry.layers = torch_ref.attention_outputs(case, feed)
            layer_bytes += sum(a.nbytes for a in entry.layers.values())
        data.append(entry)
    end_to_end = None
    if options.end_to_end:
        width, height = sizes[0]
        try:
            settings = EndToEndSettings(width, height, seed=options.seed, case=case_for(manifest))
        except ValueError as exc:
            raise ValidationInputError(f"end-to-end: {exc}") from None
        latents = settings.latents(manifest.pipeline.latent_channels, factor)
        label = " (inpainting)" if settings.inpainting else ""
        progress(f"reference end-to-end image{label} {width}x{height} with diffusers ...")
        scheduler_config = _scheduler_config(export_dir)
        try:
            image = diffusers_image(torch_ref.pipeline, settings, latents, scheduler_config)
        except Exception as exc:  # noqa: BLE001 - diffusers refused the request: one line, not a traceback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValidationInputError(f"diffusers could not generate the end-to-end {settings.case} reference "
                                       f"with {type(torch_ref.pipeline).__name__} ({type(exc).__name__}: "
                                       f"{first}); validate without --end-to-end") from None
        end_to_end = {"settings": settings.to_dict(), "latents": latents, "image": image}
    return _Reference(data, {"kind": "pytorch", "source": source.to_dict()}, torch_ref, end_to_end)


def _scheduler_config(export_dir: Path) -> dict[str, Any]:
    path = export_dir / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValidationInputError(f"cannot read {path}: {exc}") from exc


def _train_timesteps(export_dir: Path) -> int:
    return int(_scheduler_config(export_dir).get("num_train_timesteps", 1000))


def _checksums(export_dir: Path, manifest: Manifest, mode: str) -> dict[str, Any]:
    if mode not in CHECKSUM_MODES:
        raise ValidationInputError(f"--checksums must be one of {', '.join(CHECKSUM_MODES)}, got {mode!r}")
    if mode == "skip":
        return {"mode": mode}
    mismatched = list(check_files(export_dir, manifest))
    if mismatched and mode == "verify":
        raise ValidationInputError(f"checksum mismatch for {', '.join(mismatched)}: the export was changed after "
                                   f"it was written; pass --checksums report to validate it anyway")
    return {"mode": mode, "mismatched": mismatched, "verified": len(manifest.files) - len(mismatched)}
