"""Export a LinFusion pipeline into an export directory: the contract read by engines and runtime.

Everything is written into a temporary sibling folder and renamed into place only after every
component passed its checks, so a failed or interrupted export never leaves a directory that
looks valid.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from linfusion.runtime.contract import (
    ComponentSpec,
    PipelineFacts,
    component_kind,
    kinds_for,
    text_encoder_names,
)
from linfusion.runtime.manifest import MANIFEST_NAME, Manifest, file_records
from linfusion.runtime.signals import normal_permissions, terminations_interrupt

from linfusion.loader import LoadedPipeline

from . import attention_windows, chunking, controlnet, onnx_file
from . import lora as export_lora
from .components import TEXT_LENGTH, Component, build_component
from .parity import check_parity

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}


class ExportError(RuntimeError):
    """A user-facing export failure; the message is one line."""


def available_components(xl: bool, controlnets: int = 0) -> tuple[str, ...]:
    """The components of a pipeline of this family, with ``controlnets`` ControlNets attached."""
    return tuple(kind.name for kind in kinds_for(xl)) + controlnet.component_names(controlnets)


def export_pipeline(loaded: LoadedPipeline, output: str | Path, precision: str = "fp32", opset: int = 18,
                    components: list[str] | None = None, force: bool = False, skip_parity: bool = False,
                    progress: Callable[[str], None] = print,
                    max_size: tuple[int, int] = chunking.DEFAULT_MAX_SIZE,
                    tensor_limit: int = chunking.DEFAULT_TENSOR_LIMIT,
                    loras: list[tuple[str, float]] | None = None) -> Manifest:
    """Trace, check and package every requested component of ``loaded`` into ``output``.

    The UNet is token-chunked so that no tensor exceeds ``tensor_limit`` elements up to
    ``max_size`` = (width, height) pixels at batch 1 (``chunking``); a tensor that cannot be
    kept under it is refused before anything is traced. ``loras`` (path, scale) are fused
    first, through diffusers (``export.lora``)."""
    output = Path(output)
    if precision not in PRECISIONS:
        raise ExportError(f"unsupported precision '{precision}'; choose fp32 or fp16")
    if opset not in onnx_file.SUPPORTED_OPSETS:
        raise ExportError(f"unsupported opset {opset}; choose {onnx_file.SUPPORTED_OPSETS.start}"
                          f"..{onnx_file.SUPPORTED_OPSETS.stop - 1}")
    available = available_components(loaded.is_xl, len(controlnet.controlnets_of(loaded.pipeline)))
    names = components or list(available)
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise ExportError(f"unknown component(s) {', '.join(unknown)}; this pipeline has {', '.join(available)}")
    if isinstance(tensor_limit, bool) or not isinstance(tensor_limit, int) or tensor_limit < 1:
        raise ExportError(f"--tensor-limit must be a positive number of elements, got {tensor_limit!r}")
    vae_factor = _vae_factor(loaded.pipeline)
    try:
        chunking.check_max_size(tuple(max_size), vae_factor * 2 ** loaded.pipeline.unet.num_upsamplers, vae_factor)
    except chunking.TensorLimitError as exc:
        raise ExportError(str(exc)) from exc
    if output.exists() and not force:
        raise ExportError(f"{output} already exists; pass --force to replace it")
    lora_records = export_lora.fuse_loras(loaded.pipeline, loras, progress) if loras else []
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output.parent, progress)
    # SIGTERM / SIGHUP would kill the process without the cleanup below: raise Terminated instead.
    with terminations_interrupt():
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(output.name, "partial"), dir=output.parent))
        _ACTIVE.add(staging.name)
        try:
            manifest = _export_into(loaded, staging, precision, opset, names, skip_parity, progress,
                                    (int(max_size[0]), int(max_size[1])), tensor_limit, lora_records)
            normal_permissions(staging)  # mkdtemp made it 0700: give it the umask's modes
            _replace_directory(staging, output)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise ExportError(f"disk full while writing into {output.parent} "
                                  f"({onnx_file.free_bytes(output.parent) >> 20} MiB free)") from exc
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            _ACTIVE.discard(staging.name)
    return manifest


# Temporary folders beside the output: ``.NAME.partial-PID.HOST-XXXXXXXX`` while an export is
# written, ``.NAME.old-PID.HOST-XXXXXXXX`` while --force deletes the previous one. The owner's PID
# and a hash of the host name let the next export into the same parent remove the folders of a
# killed run (SIGKILL, power loss) without touching those of an export still running.
_OWNED_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)\.(?P<host>[0-9a-f]{8})-[a-z0-9_]+$")
_UNOWNED_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-[a-z0-9_]{8}$")  # older versions
_ACTIVE: set[str] = set()
"""This process's folders in use: exports may run in several threads at once."""


def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _staging_prefix(name: str, kind: str) -> str:
    return f".{name}.{kind}-{os.getpid()}.{_host_tag()}-"


def _owner_running(pid: int, folder: Path) -> bool:
    """Whether process ``pid`` of this host may still own ``folder``; when unsure, True."""
    if pid <= 0:
        return True
    if pid == os.getpid():  # ours, or an earlier process's with the same PID (containers reuse them)
        return folder.name in _ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    try:  # Linux: a process that started after the folder last changed is not its owner (PID reuse)
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return started <= folder.stat().st_mtime + 2
    except (OSError, ValueError, IndexError, StopIteration):
        return True


def remove_stale_staging(parent: Path, progress: Callable[[str], None] = print) -> list[Path]:
    """Delete the ``.NAME.partial-*`` / ``.NAME.old-*`` folders in ``parent`` whose export was killed;
    name those whose owner cannot be known in one warning line. Returns the removed folders."""
    removed, unknown = [], []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return removed
    host = _host_tag()
    for entry in entries:
        owned = _OWNED_TEMP.match(entry.name)
        if owned is None:
            if _UNOWNED_TEMP.match(entry.name) and entry.is_dir() and not entry.is_symlink():
                unknown.append(entry.name)
            continue
        if not entry.is_dir() or entry.is_symlink():
            continue
        if owned["host"] != host:
            unknown.append(entry.name)
            continue
        if _owner_running(int(owned["pid"]), entry):
            continue  # an export running now
        name = owned["name"]
        if owned["kind"] == "old" and (entry / name).exists() and not (parent / name).exists():
            unknown.append(f"{entry.name} (the previous {name}: rename {entry.name}/{name} back or delete it)")
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
            progress(f"removed {entry.name}, left behind by export process {owned['pid']}, which is gone")
    if unknown:
        progress(f"warning: left alone {', '.join(unknown)} in {parent} (owner unknown: another host or an "
                 f"older version); delete once no export is running there")
    return removed


def _export_into(loaded: LoadedPipeline, folder: Path, precision: str, opset: int, names: list[str],
                 skip_parity: bool, progress: Callable[[str], None], max_size: tuple[int, int],
                 tensor_limit: int, lora_records: list[dict]) -> Manifest:
    pipe = loaded.pipeline
    dtype = PRECISIONS[precision]
    latent_multiple = 2 ** pipe.unet.num_upsamplers
    vae_dtype = dtype
    if dtype != torch.float32 and pipe.vae.config.get("force_upcast", False):
        vae_dtype = torch.float32  # SD-XL's VAE overflows in fp16 unless it is a fixed fp16 VAE
        progress("vae: force_upcast is set, so the VAE stays fp32")
    pipe.to(dtype=dtype)
    pipe.vae.to(dtype=vae_dtype)

    specs: dict[str, ComponentSpec] = {}
    parity: dict[str, Any] = {}
    built = _components(pipe, loaded.is_xl, latent_multiple, dtype, vae_dtype, names)
    windows = {component.name: attention_windows.plan(component) for component in built}
    plan, largest = _size_limits(built, windows, max_size, tensor_limit, _vae_factor(pipe), latent_multiple,
                                 progress)
    for index, component in enumerate(built):
        label = f"[{index + 1}/{len(names)}] {component.name}"
        start = time.perf_counter()
        progress(f"{label}: tracing ...")
        chunks, traced = {}, component
        if plan is not None and component.kind.name == "unet":
            chunks, traced = plan.chunks, replace(component, trace_size=plan.trace_size)
        with (chunking.applied(component.module, chunks),
              attention_windows.applied(component.module, windows[component.name])):
            model, routed = onnx_file.trace(traced, opset)
        nodes = onnx_file.finish(model, opset)
        if nodes != routed:
            raise ExportError(f"{component.name}: {routed} LinFusion layers but {nodes} LinearAttention "
                              f"nodes in the graph")
        target = folder / component.name / "model.onnx"
        target.parent.mkdir(parents=True)
        lora_map = export_lora.write_initializer_map(component, model, target.parent)
        external = onnx_file.save(model, target)
        del model
        onnx_file.check(target)
        traced = time.perf_counter() - start
        precision_name = "fp32" if component.dtype == torch.float32 else precision
        if skip_parity:
            parity[component.name] = {"skipped": True}
            progress(f"{label}: exported in {traced:.1f}s (parity skipped)")
        else:
            result = check_parity(component, target, precision_name)
            parity[component.name] = result.to_dict()
            progress(f"{label}: exported in {traced:.1f}s; parity {result.summary()}")
            if not result.passed:
                raise ExportError(f"parity check failed: {result.summary()}")
        specs[component.name] = ComponentSpec(
            component.kind.name, f"{component.name}/model.onnx", precision_name, component.inputs,
            component.outputs, external and f"{component.name}/{external}", nodes,
            largest[component.name].largest_tensor(), lora_map=lora_map and f"{component.name}/{lora_map}",
            attention_windows=attention_windows.largest_level(windows[component.name]))

    _save_tokenizers(pipe, loaded.is_xl, folder)
    _save_scheduler_config(pipe.scheduler, folder / "scheduler")
    pipe.save_config(folder)
    manifest = Manifest(
        source={**loaded.provenance(), **controlnet.provenance(loaded)}, precision=precision, opset=opset,
        pipeline=replace(_pipeline_facts(pipe, loaded.is_xl, latent_multiple), max_size=max_size,
                         tensor_limit=tensor_limit, max_batch2_size=plan and plan.max_batch2_size),
        components=specs, tools=_tool_versions(), parity=parity, loras=lora_records)
    manifest = manifest.with_files(file_records(folder))
    (folder / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def _size_limits(components: list[Component], windows: dict[str, dict[str, int]], max_size: tuple[int, int],
                 limit: int, vae_factor: int, latent_multiple: int, progress: Callable[[str], None]
                 ) -> tuple[chunking.ChunkPlan | None, dict[str, chunking.TensorRecord]]:
    """Before any tracing: the UNet's token chunks (or the refusal) and each component's largest
    tensor at ``max_size`` (its attention windows applied), from shape-only runs."""
    start = time.perf_counter()
    plan, largest = None, {}
    try:
        for component in components:
            if component.kind.name == "unet":
                plan = chunking.plan_unet(component, max_size, limit, vae_factor, latent_multiple * vae_factor)
                largest[component.name] = plan.largest
            else:
                with attention_windows.applied(component.module, windows[component.name]):
                    largest[component.name] = chunking.largest_tensor(component, max_size, vae_factor)
    except chunking.TensorLimitError as exc:
        raise ExportError(str(exc)) from exc
    if plan is not None:
        chunked = {name: k for name, k in plan.chunks.items() if k > 1}
        progress(f"tensor limit {limit:,} at {max_size[0]}x{max_size[1]}: {len(chunked)} of {len(plan.chunks)} "
                 f"feed-forward/cross-attention modules token-chunked (up to {max(chunked.values(), default=1)} "
                 f"windows); largest UNet tensor {plan.largest.elements:,}; batch 2 up to "
                 f"{plan.max_batch2_size[0]}x{plan.max_batch2_size[1]} ({time.perf_counter() - start:.1f}s)")
    return plan, largest


def _components(pipe, xl: bool, latent_multiple: int, dtype: torch.dtype, vae_dtype: torch.dtype,
                names: list[str]) -> list[Component]:
    built = []
    for name in names:
        kind = component_kind(name)
        built.append(build_component(kind, pipe, xl, latent_multiple, vae_dtype if kind.vae else dtype, name))
    return built


def _save_tokenizers(pipe, xl: bool, folder: Path) -> None:
    """tokenizer.json for the `tokenizers` library, plus CLIP's vocab.json and merges.txt."""
    for name in (component_kind(encoder).tokenizer for encoder in text_encoder_names(xl)):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is None:
            continue
        target = folder / name
        tokenizer.save_pretrained(target)
        model = json.loads((target / "tokenizer.json").read_text("utf-8"))["model"]
        (target / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), "utf-8")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (target / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", "utf-8")
        special = {key: str(getattr(tokenizer, key)) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
        (target / "special_tokens_map.json").write_text(json.dumps(special, indent=2), "utf-8")


def _save_scheduler_config(scheduler, folder: Path) -> None:
    """The scheduler config as the model ships it: keys the file left out stay out.

    diffusers fills missing keys with the class's defaults and lists them in
    ``_use_default_values``; switching scheduler class (PNDM -> Euler) then uses the new class's
    defaults. Writing the filled-in values would freeze PNDM's defaults into every scheduler.
    """
    config = dict(scheduler.config)
    defaults = set(config.pop("_use_default_values", []))
    config = {key: value for key, value in config.items() if key not in defaults}
    config["_class_name"] = type(scheduler).__name__
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scheduler_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _vae_factor(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def _pipeline_facts(pipe, xl: bool, latent_multiple: int) -> PipelineFacts:
    vae_config = pipe.vae.config
    vae_factor = _vae_factor(pipe)
    return PipelineFacts(
        kind="sdxl" if xl else "sd",
        pipeline_class=type(pipe).__name__,
        latent_channels=pipe.vae.config.latent_channels,  # an inpainting UNet takes 2x + 1 (runtime/inpaint.py)
        latent_multiple=latent_multiple,
        vae_scale_factor=vae_factor,
        vae_scaling_factor=vae_config.scaling_factor,
        vae_shift_factor=getattr(vae_config, "shift_factor", None),
        vae_force_upcast=bool(vae_config.get("force_upcast", False)),
        default_size=pipe.unet.config.sample_size * vae_factor,
        text_length=TEXT_LENGTH,
        text_encoders=text_encoder_names(xl),
        force_zeros_for_empty_prompt=xl and bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
        requires_aesthetics_score=xl and bool(pipe.config.get("requires_aesthetics_score", False)),
        addition_time_embed_dim=pipe.unet.config.addition_time_embed_dim if xl else None,
        unet_block_channels=tuple(pipe.unet.config.block_out_channels),
        vae_block_channels=tuple(vae_config.block_out_channels),
    )


def _tool_versions() -> dict[str, str]:
    versions = {}
    for package in ("linfusion-deploy", "torch", "diffusers", "transformers", "onnx", "onnxscript",
                    "onnx-ir", "onnxruntime"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _replace_directory(staging: Path, output: Path) -> None:
    """Rename into place; an existing output (with --force) is moved aside first, then deleted.
    Interrupted between the two renames, the previous output is put back."""
    if output.exists():
        trash = Path(tempfile.mkdtemp(prefix=_staging_prefix(output.name, "old"), dir=output.parent))
        _ACTIVE.add(trash.name)
        try:
            output.rename(trash / output.name)
            staging.rename(output)
        except BaseException:
            if (trash / output.name).exists() and not output.exists():
                (trash / output.name).rename(output)
            raise
        finally:
            shutil.rmtree(trash, ignore_errors=True)
            _ACTIVE.discard(trash.name)
    else:
        staging.rename(output)

