"""Building TensorRT engines from an export directory: the thin layer that touches TensorRT.

For each component: prepare the ONNX copy (``onnx_prep``), parse it into a strongly typed
network (precision comes from the ONNX types; TensorRT 11 is always strongly typed, 10.x is
asked to be), add the optimization profiles (``profiles``), reuse and save the timing cache,
build with progress reports, and write the engine to a temporary name before renaming it into
place. ``engines.json`` (``linfusion.runtime.engine_manifest``) is written last, the same way.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from linfusion.runtime.engine_manifest import (
    ENGINE_MANIFEST_NAME,
    EngineManifest,
    EngineManifestError,
    EngineSpec,
    ProfileSpec,
    load_engine_manifest,
)
from linfusion.runtime.manifest import Manifest, load_manifest, sha256_file

from . import onnx_prep
from .plugin import aot_support, plugin_record, register_plugins
from .profiles import Range, SpatialProfile, component_profiles

PLUGIN_MODES = ("auto", "on", "off")


class TensorRTMissing(RuntimeError):
    """TensorRT (or cuda-python) is not installed here."""


class BuildError(RuntimeError):
    """TensorRT rejected the network or the build failed."""


def import_tensorrt():
    """TensorRT, or TensorRTMissing with a one-line explanation."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTMissing("TensorRT is not installed: linfusion-build needs the `tensorrt` Python package "
                              f"(10.9 or newer) on a machine with an NVIDIA GPU ({exc})") from None
    if not hasattr(trt, "Builder"):
        raise TensorRTMissing("the installed `tensorrt` package is a stub without its libraries; install "
                              "the full TensorRT wheel (tensorrt-cu12 or tensorrt-cu13)")
    return trt


def gpu_info() -> tuple[str, str]:
    """(name, "major.minor") of CUDA device 0, through cuda-python."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise TensorRTMissing("cuda-python is not installed: pip install cuda-python") from None
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise TensorRTMissing(f"no usable CUDA device: {err}")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"


def resolve_plugin(mode: str, trt, log: Callable[[str], None]) -> bool:
    if mode not in PLUGIN_MODES:
        raise ValueError(f"--plugin must be one of {', '.join(PLUGIN_MODES)}")
    if mode == "off":
        return False
    ok, why = aot_support(trt)
    if ok:
        return True
    if mode == "on":
        raise BuildError(f"--plugin on: {why}")
    log(f"plugin: off ({why}); the linear attention is inlined from its ONNX function")
    return False


@dataclass
class BuildOptions:
    spatial: list[SpatialProfile]
    batch: Range
    output: Path
    plugin: str = "auto"
    timing_cache: Path | None = None
    optimization_level: int = 3
    refittable: bool = False
    components: list[str] | None = None


class _Progress:
    """A TensorRT IProgressMonitor that prints phase starts and finishes (subclassed lazily)."""

    @staticmethod
    def create(trt, log: Callable[[str], None]):
        if not hasattr(trt, "IProgressMonitor"):
            return None

        class Monitor(trt.IProgressMonitor):
            def __init__(self) -> None:
                trt.IProgressMonitor.__init__(self)
                self.started: dict[str, float] = {}

            def phase_start(self, phase_name, parent_phase, num_steps):
                self.started[phase_name] = time.monotonic()
                if parent_phase is None:
                    log(f"  {phase_name} ({num_steps} steps)")

            def step_complete(self, phase_name, step):
                return True  # keep building

            def phase_finish(self, phase_name):
                start = self.started.pop(phase_name, None)
                if start is not None and time.monotonic() - start > 5:
                    log(f"  {phase_name}: {time.monotonic() - start:.0f}s")

        return Monitor()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def build_engine(trt, onnx_path: Path, profiles: list[ProfileSpec], options: BuildOptions,
                 log: Callable[[str], None]) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse {onnx_path}: {errors}")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    for spec in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in spec.shapes.items():
            if name in inputs:
                profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    cache_data = b""
    if options.timing_cache and options.timing_cache.is_file():
        cache_data = options.timing_cache.read_bytes()
    cache = config.create_timing_cache(cache_data)
    config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _Progress.create(trt, log)
    if monitor is not None:
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT failed to build an engine from {onnx_path} (see the messages above)")
    if options.timing_cache:
        options.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(options.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def select_components(manifest: Manifest, wanted: list[str] | None) -> list[str]:
    names = list(manifest.components)
    if not wanted:
        return names
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise ValueError(f"unknown component(s) {', '.join(unknown)}; this export has {', '.join(names)}")
    return [n for n in names if n in wanted]


def build_all(export_dir: Path, options: BuildOptions, log: Callable[[str], None] = print) -> EngineManifest:
    """Build every selected component's engine and write engines.json; returns the manifest."""
    trt = import_tensorrt()
    manifest = load_manifest(export_dir)
    gpu_name, capability = gpu_info()
    plugin = resolve_plugin(options.plugin, trt, log)
    arch = "compute_" + capability.replace(".", "")
    if plugin:
        register_plugins(arch)
    out = options.output
    out.mkdir(parents=True, exist_ok=True)
    engines = _previous_engines(out, trt.__version__, gpu_name, capability)
    selected = select_components(manifest, options.components)
    log(f"TensorRT {trt.__version__} on {gpu_name} (sm_{capability.replace('.', '')}); plugin "
        f"{'on' if plugin else 'off'}; building {', '.join(selected)}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="linfusion-build-", dir=out) as scratch:
        for index, name in enumerate(selected, 1):
            spec = manifest.components[name]
            source = export_dir / spec.path
            use_plugin = plugin and spec.linear_attention_nodes > 0
            prepared = onnx_prep.prepare(source, Path(scratch) / name / "model.onnx", use_plugin)
            profiles = component_profiles(manifest, name, options.spatial, options.batch)
            log(f"[{index}/{len(selected)}] {name}: {spec.precision}, {len(profiles)} profile(s), "
                f"{prepared.attention_nodes} linear-attention node(s){' as plugins' if use_plugin else ''}")
            t0 = time.monotonic()
            data = build_engine(trt, prepared.path, profiles, options, log)
            seconds = time.monotonic() - t0
            engine_file = f"{name}.plan"
            _write_atomic(out / engine_file, data)
            record = manifest.files.get(spec.path, {})
            engines[name] = EngineSpec(
                engine=engine_file, engine_sha256=sha256_file(out / engine_file), onnx=spec.path,
                onnx_sha256=record.get("sha256") or sha256_file(source), precision=spec.precision,
                profiles=profiles, plugin=use_plugin, linear_attention_nodes=prepared.attention_nodes,
                build_seconds=round(seconds, 1), refittable=options.refittable,
                optimization_level=options.optimization_level)
            log(f"[{index}/{len(selected)}] {name}: built in {seconds:.1f}s ({len(data) / 2**20:.1f} MiB)")
    result = EngineManifest(tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability,
                            components=engines, plugin=plugin_record(plugin, arch if plugin else None),
                            tools={"tensorrt": trt.__version__})
    _write_atomic(out / ENGINE_MANIFEST_NAME, result.to_json().encode())
    log(f"done in {time.monotonic() - started:.1f}s: {out / ENGINE_MANIFEST_NAME}")
    return result


def _previous_engines(out: Path, version: str, gpu_name: str, capability: str) -> dict[str, EngineSpec]:
    """Engines already in ``out`` that this TensorRT and GPU can still load (kept on partial rebuilds)."""
    try:
        previous = load_engine_manifest(out)
        previous.check_compatible(version, gpu_name, capability)
    except EngineManifestError:
        return {}
    return {n: s for n, s in previous.components.items() if (out / s.engine).is_file()}
