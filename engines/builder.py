"""Building TensorRT engines from an export directory: the thin layer that touches TensorRT.

For each component: prepare the ONNX copy (``onnx_prep``), parse it into a strongly typed
network (precision comes from the ONNX types; TensorRT 11 is always strongly typed, 10.x is
asked to be), add the optimization profiles (``profiles``), reuse and save the timing cache,
build with progress reports, and write the engine to a temporary name before renaming it into
place. ``engines.json`` (``linfusion.runtime.engine_manifest``) is written last, the same way.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from linfusion.runtime.cuda import (
    CudaError,
    TensorRTUnavailable,
    current_gpu,
    driver_cuda_version,
    import_tensorrt,
    tensorrt_logger,
)
from linfusion.runtime.engine_manifest import (
    ENGINE_MANIFEST_NAME,
    EngineManifest,
    EngineManifestError,
    EngineSpec,
    ProfileSpec,
    load_engine_manifest,
)
from linfusion.runtime.manifest import Manifest, load_manifest, sha256_file
from linfusion.runtime.signals import TERMINATION_SIGNALS, Terminated, current_umask

from . import kernel_build as K
from . import onnx_prep
from .plugin import aot_support, plugin_record, register_plugins, tensorrt_version_tuple
from .profiles import Range, SpatialProfile, component_profiles

PLUGIN_MODES = ("auto", "on", "off")


class TensorRTMissing(RuntimeError):
    """TensorRT (or cuda-python) is not installed here."""


class BuildError(RuntimeError):
    """TensorRT rejected the network or the build failed."""


def builder_tensorrt():
    """TensorRT with its builder, or TensorRTMissing with a one-line remedy."""
    try:
        return import_tensorrt("Builder")
    except TensorRTUnavailable as exc:
        raise TensorRTMissing(f"linfusion-build needs TensorRT 10.10+ for the plugins: {exc}") from None


def gpu_info() -> tuple[str, str]:
    """(name, "major.minor") of CUDA device 0, through cuda-python."""
    try:
        return current_gpu()
    except ImportError:
        raise TensorRTMissing("cuda-python is not installed: pip install 'linfusion-deploy[gpu]'") from None
    except CudaError as exc:
        raise TensorRTMissing(f"no usable CUDA device: {exc}") from None


def check_nvrtc_against_driver(log: Callable[[str], None]) -> str:
    """The NVRTC version, after checking that the driver can load the PTX it writes: a driver
    only JIT-compiles PTX from CUDA versions up to its own."""
    nvrtc = K.nvrtc_version()
    driver = driver_cuda_version()
    if nvrtc > driver:
        if nvrtc[0] != driver[0]:
            fix = f"install the CUDA {driver[0]} stack (pip install 'linfusion-deploy[gpu]' for CUDA 12)"
        else:
            wheel = "nvidia-cuda-nvrtc-cu12" if driver[0] == 12 else "nvidia-cuda-nvrtc"
            fix = f"pip install '{wheel}=={driver[0]}.{driver[1]}.*'"
        raise BuildError(f"NVRTC {nvrtc[0]}.{nvrtc[1]} writes PTX that this driver (CUDA {driver[0]}.{driver[1]}) "
                         f"cannot load: {fix}, or update the driver")
    log(f"plugin kernels: NVRTC {nvrtc[0]}.{nvrtc[1]}, driver CUDA {driver[0]}.{driver[1]}")
    return f"{nvrtc[0]}.{nvrtc[1]}"


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
    kernels: str = "auto"
    """Linear-attention kernel tactics offered to TensorRT: auto, cuda-core or tensor-core."""
    timing_cache: Path | None = None
    """None: OUTPUT/timing-<TensorRT version>-sm<XY>.cache, so caches of other GPUs or versions
    are kept rather than overwritten."""
    optimization_level: int = 3
    refittable: bool = False
    components: list[str] | None = None


class _Progress:
    """A TensorRT IProgressMonitor that prints phase starts and finishes and cancels the build
    on Ctrl-C (subclassed lazily).

    TensorRT calls the monitor from inside ``build_serialized_network`` and swallows exceptions
    raised in it, so a KeyboardInterrupt would be lost: SIGINT only sets a flag during the build,
    ``step_complete`` returns False to cancel, and the build raises KeyboardInterrupt after."""

    @staticmethod
    def create(trt, log: Callable[[str], None], interrupted: threading.Event):
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
                return not interrupted.is_set()  # False cancels the build

            def phase_finish(self, phase_name):
                start = self.started.pop(phase_name, None)
                if start is not None and time.monotonic() - start > 5:
                    log(f"  {phase_name}: {time.monotonic() - start:.0f}s")

        return Monitor()


class _InterruptFlag:
    """Turns SIGINT, SIGTERM and SIGHUP into a flag for the duration of a build (main thread
    only); the build stops at its next progress step. A SIGTERM or SIGHUP is then handed on when
    the block ends: to the previous Python handler, or as ``Terminated`` (a KeyboardInterrupt)
    where the default would have killed the process, so the same cleanup as for Ctrl-C runs. An
    ignored SIGTERM or SIGHUP (``nohup``) stays ignored."""

    SIGNALS = (signal.SIGINT, *TERMINATION_SIGNALS)

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _set(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        self.event.set()

    def __enter__(self) -> threading.Event:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signum == signal.SIGINT or signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._set)
        return self.event

    def __exit__(self, exc_type, *exc) -> None:
        for signum, previous in self._previous.items():  # None: installed from C; restore it anyway
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        if self.signum in (None, signal.SIGINT) or (exc_type is not None and issubclass(exc_type, KeyboardInterrupt)):
            return
        previous = self._previous[self.signum]
        if callable(previous):
            previous(self.signum, None)
        else:
            raise Terminated(self.signum)


def default_timing_cache(output: Path, version: str, capability: str) -> Path:
    return output / f"timing-{version}-sm{capability.replace('.', '')}.cache"


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())  # mkstemp makes 0600 files
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def network_flags(trt) -> int:
    """Strongly typed on 10.x; TensorRT 11 always is (its flag is deprecated and ignored)."""
    if tensorrt_version_tuple(trt.__version__)[:1] >= (11,):
        return 0
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        raise TensorRTMissing(f"TensorRT {trt.__version__} cannot build strongly typed networks; install 10.x "
                              "(10.10 or newer for the plugins) or 11.x")
    return 1 << int(flag)


def add_profiles(builder, config, network_inputs: dict[str, tuple[int, ...]], profiles: list[ProfileSpec],
                 onnx_path: Path) -> None:
    """One optimization profile per ProfileSpec, in order (the runtime selects them by index);
    every dynamic network input needs a range and every range must name a network input."""
    for index, spec in enumerate(profiles):
        unknown = sorted(set(spec.shapes) - set(network_inputs))
        if unknown:
            raise BuildError(f"{onnx_path}: profile names input(s) {', '.join(unknown)} that the network lacks")
        missing = sorted(n for n, dims in network_inputs.items() if any(d < 0 for d in dims) and n not in spec.shapes)
        if missing:
            raise BuildError(f"{onnx_path}: no shape range for dynamic input(s) {', '.join(missing)}")
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in spec.shapes.items():
            profile.set_shape(name, low, opt, high)
        if config.add_optimization_profile(profile) != index:
            raise BuildError(f"{onnx_path}: TensorRT rejected optimization profile {index} ({spec.shapes})")


def use_timing_cache(config, path: Path | None, log: Callable[[str], None]):
    """Load the cache at ``path`` when TensorRT accepts it; otherwise start an empty one."""
    if path is not None and path.is_file():
        cache = config.create_timing_cache(path.read_bytes())
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
        log(f"  timing cache {path} is from another TensorRT or GPU, or damaged: starting a new one")
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def build_engine(trt, onnx_path: Path, profiles: list[ProfileSpec], options: BuildOptions,
                 log: Callable[[str], None]) -> memoryview:
    """The serialized engine (a view of TensorRT's buffer, not a copy); reuses and updates
    ``options.timing_cache`` when set."""
    timing_cache = options.timing_cache
    logger = tensorrt_logger(trt)
    if hasattr(trt, "init_libnvinfer_plugins"):
        trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse {onnx_path}: {errors}")
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    add_profiles(builder, config, inputs, profiles, onnx_path)
    use_timing_cache(config, timing_cache, log)
    with _InterruptFlag() as interrupted:
        monitor = _Progress.create(trt, log, interrupted)
        if monitor is not None:
            config.progress_monitor = monitor
        serialized = builder.build_serialized_network(network, config)
    if interrupted.is_set():
        raise KeyboardInterrupt
    if serialized is None:
        raise BuildError(f"TensorRT failed to build an engine from {onnx_path} (see the messages above)")
    updated = config.get_timing_cache()
    if timing_cache is not None and updated is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(timing_cache, memoryview(updated.serialize()))
    return memoryview(serialized)


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
    trt = builder_tensorrt()
    manifest = load_manifest(export_dir)
    gpu_name, capability = gpu_info()
    if options.kernels not in K.KERNEL_CHOICES:
        raise ValueError(f"--attention-kernels must be one of {', '.join(K.KERNEL_CHOICES)}")
    plugin = resolve_plugin(options.plugin, trt, log)
    arch = "compute_" + capability.replace(".", "")
    nvrtc = None
    if plugin:
        try:
            nvrtc = check_nvrtc_against_driver(log)
        except (BuildError, K.KernelCompileError) as exc:
            if options.plugin == "on":
                raise BuildError(f"--plugin on: {exc}") from None
            log(f"plugin: off ({exc}); the linear attention is inlined from its ONNX function")
            plugin = False
    if plugin:
        register_plugins(arch, options.kernels)
    elif options.kernels != "auto":
        log(f"--attention-kernels {options.kernels} has no effect: the plugin is off")
    if options.timing_cache is None:
        options = replace(options, timing_cache=default_timing_cache(options.output, trt.__version__, capability))
    out = options.output
    out.mkdir(parents=True, exist_ok=True)
    engines = _previous_engines(out, trt.__version__, gpu_name, capability)
    selected = select_components(manifest, options.components)
    log(f"TensorRT {trt.__version__} on {gpu_name} (sm_{capability.replace('.', '')}); plugin "
        f"{'on' if plugin else 'off'}; building {', '.join(selected)}")
    started = time.monotonic()

    def write_manifest() -> EngineManifest:
        result = EngineManifest(tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability,
                                components=engines, plugin=plugin_record(plugin, arch if plugin else None,
                                                                         options.kernels, nvrtc),
                                tools={"tensorrt": trt.__version__})
        _write_atomic(out / ENGINE_MANIFEST_NAME, result.to_json().encode())
        return result

    built = 0
    result = None
    with tempfile.TemporaryDirectory(prefix="linfusion-build-", dir=out) as scratch:
        try:
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
                record = manifest.files.get(spec.path, {})
                engine = EngineSpec(
                    engine=f"{name}.plan", engine_sha256=hashlib.sha256(data).hexdigest(), onnx=spec.path,
                    onnx_sha256=record.get("sha256") or sha256_file(source), precision=spec.precision,
                    profiles=profiles, plugin=use_plugin, linear_attention_nodes=prepared.attention_nodes,
                    build_seconds=round(seconds, 1), refittable=options.refittable,
                    optimization_level=options.optimization_level)
                # The record is ready before the plan replaces the old one, so that whatever stops
                # the build afterwards, engines.json below describes the files on disk.
                _write_atomic(out / engine.engine, data)
                engines[name] = engine
                built += 1
                log(f"[{index}/{len(selected)}] {name}: built in {seconds:.1f}s ({data.nbytes / 2**20:.1f} MiB)")
        finally:
            if built:  # also after an interruption or a failure: the engines built so far replaced old ones
                result = write_manifest()
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
