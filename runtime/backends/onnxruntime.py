"""ONNX Runtime backend: one InferenceSession per component, created once and shared by threads.

On a GPU provider the denoising loop runs through I/O binding (``bind``): the text conditioning
is copied to the device once per generation, each step uploads only the latents and the
timestep, and the output lands in a device buffer of the loop's own that is reused every step;
only the noise prediction the numpy scheduler needs comes back to the host. On the CPU provider
the same code path runs (device "cpu"), which is how CI tests it.

CUDA provider options (``CUDA_DEFAULTS``, overridable with ``provider_options``): the device id,
``arena_extend_strategy=kSameAsRequested`` (the default power-of-two arena growth wastes up to
half of a large activation), cuDNN's exhaustive convolution search (ORT's default; it pays for
itself over a denoising loop's many calls at one shape), and CUDA graphs off (they need fixed
shapes and addresses; ``enable_cuda_graph=1`` may be tried for fixed-size services).
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import model_cache
from ..contract import ComponentSpec
from ..manifest import ManifestError
from ..model_cache import ModelCache
from .base import Backend, BoundRunner, ModelRunner

CUDA_DEFAULTS: dict[str, Any] = {"device_id": 0, "arena_extend_strategy": "kSameAsRequested",
                                 "cudnn_conv_algo_search": "EXHAUSTIVE", "enable_cuda_graph": "0"}
# Session settings, each measured on sd15-small (docs/serving.md "Cold start and memory");
# ``session_options`` overrides them per key, ``config`` holds ORT session config entries.
# - memory pattern off: ORT plans a new pattern per input shape and keeps it, so RSS grew by
#   ~20 % on the second call at 512 px (1395 -> 1666 MiB) and ~80 % at 1024 px; off: no growth,
#   peak -29 % at 512 px, same CPU time.
# - prepacking off: loading 2x faster (0.7-1.0 s against 1.9-2.2 s from the cache) and 415 MiB
#   less resident after loading (96 against 511 MiB), same CPU time per image at 512 and 1024 px.
# - CPU arena kept: without it a 512 px image costs ~25 % more CPU time (fresh pages each call);
#   it lowers the 1024 px untiled peak by 25 % (3800 -> 2855 MiB): LINFUSION_ORT_ARENA=off.
# - one CPU arena for all sessions of the process (ORT's environment allocator): each session's own
#   arena stays at its high-water mark, so the text encoder's, UNet's and VAE's peaks added up;
#   shared, the VAE decoder reuses what the UNet freed. 1024 px untiled (VAE attention windowed):
#   3239 -> 1988 MiB, same time. It grows by powers of two from SHARED_ARENA_INITIAL bytes of address
#   space (pages count only once touched); grown by exactly what is asked, its regions fragment and
#   nothing is saved (3216 MiB). LINFUSION_ORT_ARENA=session gives each session its own.
ARENA_ENV = "LINFUSION_ORT_ARENA"
ARENA_CHOICES = {"shared": (True, True), "on": (True, True), "session": (True, False), "off": (False, False),
                 "0": (False, False), "false": (False, False), "no": (False, False)}
"""LINFUSION_ORT_ARENA value -> (enable_cpu_mem_arena, shared_arena)."""
SHARED_ARENA_INITIAL = 256 * 2**20
SESSION_DEFAULTS: dict[str, Any] = {"graph_optimization_level": "ORT_ENABLE_ALL", "enable_mem_pattern": False,
                                    "enable_cpu_mem_arena": True, "shared_arena": True,
                                    "config": {"session.disable_prepacking": "1"}}
# Per component kind, over SESSION_DEFAULTS. (The arena off for the VAE only was measured worse
# than either setting for all: 3655 MiB at 1024 px, 1463 MiB at 512 px.)
COMPONENT_SETTINGS: dict[str, dict[str, Any]] = {}
# Session config entries that do not change the optimised graph (left out of the cache key).
RUNTIME_ONLY_CONFIG = ("session.intra_op.", "session.inter_op.", "session.use_env_allocators",
                       "session.use_device_allocator_for_initializers", "session.disable_prepacking")
# A cached model is already optimised (at the level its key records).
ORT_LEVEL_FOR_CACHED = "ORT_ENABLE_ALL"
# How a cache entry is written: weights in one external file, which ORT maps instead of copying.
CACHE_SAVE_CONFIG = {"session.optimized_model_external_initializers_file_name": "model.data",
                     "session.optimized_model_external_initializers_min_size_in_bytes": "1024"}
DEVICE_OF_PROVIDER = {"CUDAExecutionProvider": "cuda", "ROCMExecutionProvider": "cuda"}

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider",
                       "CoreMLExecutionProvider", "CPUExecutionProvider")


def best_providers() -> list[str]:
    """The fastest available execution provider first; the CPU always last as the fallback.

    TensorRT's ORT provider is left out on purpose: our engines come from linfusion-build.
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in available]


def provider_list(providers: list[str], options: dict[str, dict[str, Any]] | None = None) -> list:
    """ONNX Runtime's providers argument: names, or (name, options) for those with options."""
    result: list = []
    for name in providers:
        merged = {**(CUDA_DEFAULTS if name == "CUDAExecutionProvider" else {}), **(options or {}).get(name, {})}
        result.append((name, {k: str(v) for k, v in merged.items()}) if merged else name)
    return result


class OnnxRuntimeRunner(ModelRunner):
    def __init__(self, name: str, spec: ComponentSpec, session, io_binding: bool = True,
                 new_options: Callable[[], Any] | None = None) -> None:
        super().__init__(name, spec)
        self.session = session
        self.new_options = new_options
        """Fresh SessionOptions as this session's were made (a LoRA swap builds its session with them)."""
        provider = session.get_providers()[0]
        self.device = DEVICE_OF_PROVIDER.get(provider, "cpu")
        self.device_id = int(session.get_provider_options().get(provider, {}).get("device_id", 0))
        self.io_binding = io_binding

    def _feed(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {name: np.ascontiguousarray(inputs[name], dtype=self.input_dtype(name))
                for name in self.input_names if name in inputs}

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        return dict(zip(names, self.session.run(names, self._feed(inputs))))

    def bind(self, constants: dict[str, np.ndarray]) -> BoundRunner:
        if not self.io_binding:
            return super().bind(constants)
        return OrtBoundRunner(self, constants)


class OrtBoundRunner(BoundRunner):
    """I/O binding for one loop: constants on the device once, outputs into reused device buffers."""

    def __init__(self, runner: OnnxRuntimeRunner, constants: dict[str, np.ndarray]) -> None:
        import onnxruntime as ort

        super().__init__(runner, constants)
        self.ort = ort
        self.device_constants = {
            name: ort.OrtValue.ortvalue_from_numpy(value, runner.device, runner.device_id)
            for name, value in runner._feed(constants).items()}
        self.output_buffers: dict[tuple[str, tuple[int, ...]], Any] = {}
        self.lock = threading.Lock()  # one loop, but a caller may still share it

    def _output(self, name: str, shape: tuple[int, ...]):
        key = (name, shape)
        if key not in self.output_buffers:
            runner = self.runner
            dtype = np.dtype(next(t.dtype for t in runner.spec.outputs if t.name == name))
            self.output_buffers[key] = self.ort.OrtValue.ortvalue_from_shape_and_type(
                list(shape), dtype, runner.device, runner.device_id)
        return self.output_buffers[key]

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None,
            output_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
        """``output_shapes`` lets an output go into a reused buffer (ORT allocates it otherwise)."""
        runner = self.runner
        names = outputs or runner.output_names
        with self.lock:
            binding = runner.session.io_binding()
            for name, value in self.device_constants.items():
                binding.bind_ortvalue_input(name, value)
            for name, value in runner._feed(inputs).items():
                binding.bind_cpu_input(name, value)
            for name in names:
                shape = (output_shapes or {}).get(name)
                if shape is None:
                    binding.bind_output(name, runner.device, runner.device_id)
                else:
                    binding.bind_ortvalue_output(name, self._output(name, tuple(shape)))
            runner.session.run_with_iobinding(binding)
            results = binding.copy_outputs_to_cpu()
        return dict(zip(names, results))

    def batch(self, name: str) -> int:
        return int(self.constants[name].shape[0])


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, providers: list[str] | None = None, intra_op_threads: int = 0,
                 provider_options: dict[str, dict[str, Any]] | None = None, io_binding: bool = True,
                 session_options: dict[str, Any] | None = None) -> None:
        self.providers = providers or best_providers()
        self.intra_op_threads = intra_op_threads
        self.provider_options = provider_options
        self.io_binding = io_binding
        self.session_options = dict(session_options or {})
        """Overrides of ``SESSION_DEFAULTS`` and ``COMPONENT_SETTINGS``, for every component."""
        self.cache: ModelCache | None = None
        """Set by ``model_cache.attach``: optimised models are read from / written to it."""

    @classmethod
    def is_available(cls, export_dir: Path) -> bool:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False
        return True

    def settings(self, kind: str) -> dict[str, Any]:
        """The session settings of a component of this kind."""
        return {**SESSION_DEFAULTS, **COMPONENT_SETTINGS.get(kind, {}), **arena_environment(), **self.session_options}

    def shares_cpu_arena(self, settings: dict[str, Any] | None = None) -> bool:
        """Whether the sessions (made with ``settings``, default the UNet's) share one CPU arena."""
        settings = self.settings("unet") if settings is None else settings
        return bool(settings["enable_cpu_mem_arena"] and settings.get("shared_arena")) and shared_cpu_arena()

    def _options(self, settings: dict[str, Any], cached: bool = False, save_to: Path | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        level = ORT_LEVEL_FOR_CACHED if cached else settings["graph_optimization_level"]
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.intra_op_num_threads = self.intra_op_threads
        options.enable_mem_pattern = bool(settings["enable_mem_pattern"])
        options.enable_cpu_mem_arena = bool(settings["enable_cpu_mem_arena"])
        for key, value in settings["config"].items():
            options.add_session_config_entry(key, str(value))
        if self.shares_cpu_arena(settings):
            options.add_session_config_entry("session.use_env_allocators", "1")
        if save_to is not None:
            options.optimized_model_filepath = str(save_to / model_cache.MODEL)
            options.log_severity_level = 3  # not the warning that the graph is for this CPU: the key says so
            for key, value in CACHE_SAVE_CONFIG.items():
                options.add_session_config_entry(key, value)
        return options

    @staticmethod
    def _graph_settings(settings: dict[str, Any]) -> dict[str, Any]:
        """What changes the optimised graph (part of the cache key); threads and allocators do not."""
        return {"level": settings["graph_optimization_level"], "save": CACHE_SAVE_CONFIG,
                "config": {k: str(v) for k, v in settings["config"].items() if not k.startswith(RUNTIME_ONLY_CONFIG)}}

    def _session(self, path: Path, providers: list, settings: dict[str, Any], cached: bool = False,
                 save_to: Path | None = None):
        import onnxruntime as ort

        return ort.InferenceSession(str(path), self._options(settings, cached, save_to), providers=providers)

    def load(self, export_dir: Path, component: str, spec: ComponentSpec) -> ModelRunner:
        providers = provider_list(self.providers, self.provider_options)
        path = Path(export_dir) / spec.path
        settings = self.settings(spec.kind)
        session = self._cached_session(component, spec, path, providers, settings)
        if session is None:
            try:
                session = self._session(path, providers, settings)
            except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types (InvalidProtobuf, ...)
                raise ManifestError(f"ONNX Runtime cannot load {component} ({path}): {_first_line(exc)}; the file "
                                    f"may be damaged: check it without --no-verify / verify=False, or re-export") from None
        return OnnxRuntimeRunner(component, spec, session, self.io_binding,
                                 functools.partial(self._options, settings))

    def _cached_session(self, component: str, spec: ComponentSpec, path: Path, providers: list,
                        settings: dict[str, Any]):
        """A session from the cache, or from the export while writing the cache's entry; None when
        the cache is off or cannot be written (the caller then loads the export as before)."""
        cache = self.cache
        if cache is None:
            return None
        if not set(self.providers) <= model_cache.CACHEABLE_PROVIDERS:
            cache.events.append((component, "off: provider"))
            return None
        key = cache.key(spec, providers, self._graph_settings(settings))
        cached = cache.lookup(component, key)
        if cached is not None:
            try:
                return self._session(cached, providers, settings, cached=True)
            except Exception as exc:  # noqa: BLE001 - a damaged entry: rebuild it below
                cache.discard(component, key, f"ONNX Runtime cannot load it: {_first_line(exc)}")
        staged = cache.staging()
        if staged is None:
            return None
        try:
            session = self._session(path, providers, settings, save_to=staged)
        except Exception:  # noqa: BLE001 - the caller loads the export without the cache and reports errors
            shutil.rmtree(staged, ignore_errors=True)
            return None
        cache.commit(component, staged, key)
        return session


def arena_environment() -> dict[str, bool]:
    """The arena settings LINFUSION_ORT_ARENA asks for ({} when unset); ValueError (one line) for
    a value it does not know."""
    arena = os.environ.get(ARENA_ENV, "").strip().lower()
    if arena and arena not in ARENA_CHOICES:
        raise ValueError(f"{ARENA_ENV}={arena!r}: use shared (the default), session or off")
    return dict(zip(("enable_cpu_mem_arena", "shared_arena"), ARENA_CHOICES[arena])) if arena else {}


_SHARED_ARENA: list[bool] = []
_SHARED_ARENA_LOCK = threading.Lock()


def shared_cpu_arena() -> bool:
    """Register the process's shared CPU arena with ONNX Runtime once; False where it cannot be (the
    sessions then keep arenas of their own). One the host application registered is used as it is."""
    with _SHARED_ARENA_LOCK:
        if not _SHARED_ARENA:
            import onnxruntime as ort

            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                # max memory 0 (no cap), growth 0 (kNextPowerOfTwo), dead bytes per chunk -1 (ORT's default)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 0, SHARED_ARENA_INITIAL, -1))
                _SHARED_ARENA.append(True)
            except Exception as exc:  # noqa: BLE001 - ORT raises its own types
                _SHARED_ARENA.append("already" in str(exc).lower())
        return _SHARED_ARENA[0]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
