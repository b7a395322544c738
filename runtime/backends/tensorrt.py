"""TensorRT backend: engines from ``linfusion-build``, driven through cuda-python (never torch).

* ``engines/engines.json`` (``..engine_manifest``) is checked against the installed TensorRT and
  the GPU before any engine is deserialized, so a mismatch is a clear error, not a crash.
* Every engine's execution context uses one shared device-memory block for its activations
  (user-managed context memory), sized to the largest engine and grown when needed. Because
  the block is shared, runs are serialized by one lock per backend; ``run`` is thread-safe.
* Input and output device buffers are preallocated per input-shape set and reused.
* Per call: ``set_optimization_profile_async`` (when the profile changes), ``set_input_shape``,
  ``set_tensor_address``, ``execute_async_v3`` on the backend's stream; numpy in and out.
* A component without an engine (for example one left out with ``--components``) runs on
  ONNX Runtime.

Imports nothing from linfusion.export, linfusion.engines or torch; TensorRT and cuda-python are
imported when the backend is used, so this module imports everywhere.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..contract import ComponentSpec
from ..cuda import (
    CudaError,
    DeviceBuffer,
    TensorRTUnavailable,
    check_cuda,
    cudart,
    current_gpu,
    import_tensorrt,
    tensorrt_logger,
)
from ..engine_manifest import (
    EngineManifest,
    EngineManifestError,
    EngineSpec,
    engines_dir,
    load_engine_manifest,
)
from ..manifest import sha256_file
from .base import Backend, ModelRunner, ShapeError

logger = logging.getLogger(__name__)
BUFFER_SETS_PER_RUNNER = 4


class SharedContextMemory:
    """One activation block for all execution contexts; grows and rebinds them when needed."""

    def __init__(self) -> None:
        self.buffer: DeviceBuffer | None = None
        self.contexts: list = []

    def attach(self, context, size: int) -> None:
        self.contexts.append(context)
        if self.buffer is None or self.buffer.nbytes < size:
            old = self.buffer
            self.buffer = DeviceBuffer(size)
            if old is not None:
                old.free()
            for ctx in self.contexts:
                self._bind(ctx)
        else:
            self._bind(context)

    def detach(self, context) -> None:
        """Forget a closed runner's context so that it is neither kept alive nor rebound."""
        self.contexts = [c for c in self.contexts if c is not context]

    def _bind(self, context) -> None:
        if hasattr(context, "set_device_memory"):
            context.set_device_memory(self.buffer.ptr, self.buffer.nbytes)
        else:  # TensorRT < 10.1
            context.device_memory = self.buffer.ptr

    def free(self) -> None:
        self.contexts.clear()
        if self.buffer is not None:
            self.buffer.free()
            self.buffer = None


def _np_dtype(trt, dtype) -> np.dtype:
    if hasattr(trt, "bfloat16") and dtype == trt.bfloat16:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(trt.nptype(dtype))


class TensorRTRunner(ModelRunner):
    def __init__(self, name: str, spec: ComponentSpec, engine_spec: EngineSpec, engine, context,
                 backend: TensorRTBackend) -> None:
        super().__init__(name, spec)
        self.engine_spec = engine_spec
        self.engine = engine
        self.context = context
        self.backend = backend
        self.profile: int | None = None
        self.buffers: OrderedDict[tuple, dict[str, DeviceBuffer]] = OrderedDict()
        trt = backend.trt
        self.io = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.engine_inputs = [n for n in self.io if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.engine_outputs = [n for n in self.io if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _np_dtype(trt, engine.get_tensor_dtype(n)) for n in self.io}

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        super().check_shapes(shapes)
        shapes = {k: tuple(v) for k, v in shapes.items() if k in self.engine_inputs}
        if shapes and self.engine_spec.profile_index(shapes) is None:
            allowed = " | ".join(p.describe() for p in self.engine_spec.profiles)
            raise ShapeError(f"{self.name}: input shapes {shapes} are outside the TensorRT engine's optimization "
                             f"profiles ({allowed}); rebuild with `linfusion-build --min-size/--max-size` or "
                             f"`--sizes` to cover them")

    def _buffers_for(self, key: tuple, shapes: dict[str, tuple[int, ...]]) -> dict[str, DeviceBuffer]:
        if key in self.buffers:
            self.buffers.move_to_end(key)
            return self.buffers[key]
        buffers = {}
        for name in self.io:
            shape = shapes[name] if name in shapes else tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ShapeError(f"{self.name}: TensorRT could not infer the shape of '{name}' ({shape})")
            buffers[name] = DeviceBuffer(int(np.prod(shape)) * self.dtypes[name].itemsize)
        self.buffers[key] = buffers
        while len(self.buffers) > BUFFER_SETS_PER_RUNNER:
            _, old = self.buffers.popitem(last=False)
            for buf in old.values():
                buf.free()
        return buffers

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        feed = {n: np.ascontiguousarray(inputs[n], dtype=self.dtypes[n]) for n in self.engine_inputs}
        shapes = {n: a.shape for n, a in feed.items()}
        self.check_shapes(shapes)
        profile = self.engine_spec.profile_index(shapes)
        rt, stream = cudart(), self.backend.stream
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self.backend.lock:
            if self.context is None:
                raise CudaError(f"{self.name}: the TensorRT runner was closed")
            if profile != self.profile:
                self.context.set_optimization_profile_async(profile, stream)
                self.profile = profile
            for n, a in feed.items():
                if not self.context.set_input_shape(n, a.shape):
                    raise ShapeError(f"{self.name}: TensorRT rejected shape {a.shape} for '{n}'")
            key = (profile, tuple(shapes[n] for n in self.engine_inputs))
            out_shapes = {n: tuple(self.context.get_tensor_shape(n)) for n in self.engine_outputs}
            buffers = self._buffers_for(key, {**shapes, **out_shapes})
            for n in self.io:
                if not self.context.set_tensor_address(n, buffers[n].ptr):
                    raise CudaError(f"{self.name}: TensorRT rejected the device address of '{n}'")
            for n, a in feed.items():
                check_cuda(rt.cudaMemcpyAsync(buffers[n].ptr, a.ctypes.data, a.nbytes, h2d, stream))
            if not self.context.execute_async_v3(stream):
                raise CudaError(f"{self.name}: TensorRT execution failed")
            results = {}
            for n in names:
                host = np.empty(out_shapes[n], dtype=self.dtypes[n])
                check_cuda(rt.cudaMemcpyAsync(host.ctypes.data, buffers[n].ptr, host.nbytes, d2h, stream))
                results[n] = host
            check_cuda(rt.cudaStreamSynchronize(stream))
        return results

    def close(self) -> None:
        with self.backend.lock:  # a run on another thread may be using the buffers
            for buffers in self.buffers.values():
                for buf in buffers.values():
                    buf.free()
            self.buffers.clear()
            if self.context is not None:
                self.backend.memory.detach(self.context)
            self.context = None
            self.engine = None


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self) -> None:
        self.trt = self.load_libraries()
        self.trt_logger = tensorrt_logger(self.trt)
        self.runtime = self.trt.Runtime(self.trt_logger)
        self.lock = threading.RLock()
        self.memory = SharedContextMemory()
        self.stream = int(check_cuda(cudart().cudaStreamCreate()))
        self.manifests: dict[Path, EngineManifest] = {}
        self.fallback = None

    @staticmethod
    def load_libraries():
        trt = import_tensorrt("Runtime")
        try:
            cudart()  # cuda-python must be importable too
        except ImportError as exc:
            raise TensorRTUnavailable(f"cuda-python is not installed ({exc}): pip install 'linfusion-deploy[gpu]'") \
                from None
        return trt

    @classmethod
    def is_available(cls, export_dir: Path) -> bool:
        try:
            manifest = load_engine_manifest(engines_dir(export_dir))
            trt = cls.load_libraries()
            manifest.check_compatible(trt.__version__, *current_gpu())
        except Exception:  # noqa: BLE001 - any failure means "use another backend"
            return False
        return True

    def manifest(self, export_dir: Path) -> EngineManifest:
        key = Path(export_dir).resolve()
        if key not in self.manifests:
            manifest = load_engine_manifest(engines_dir(export_dir))
            manifest.check_compatible(self.trt.__version__, *current_gpu())
            self.manifests[key] = manifest
        return self.manifests[key]

    def load(self, export_dir: Path, component: str, spec: ComponentSpec) -> ModelRunner:
        manifest = self.manifest(export_dir)
        engine_spec = manifest.components.get(component)
        if engine_spec is None:
            logger.warning("no TensorRT engine for %s; running it with ONNX Runtime", component)
            if self.fallback is None:
                from .onnxruntime import OnnxRuntimeBackend

                self.fallback = OnnxRuntimeBackend()
            return self.fallback.load(export_dir, component, spec)
        path = engines_dir(export_dir) / engine_spec.engine
        if not path.is_file():
            raise EngineManifestError(f"engine file {path} is missing; rebuild with `linfusion-build {export_dir}`")
        if sha256_file(path) != engine_spec.engine_sha256:
            raise EngineManifestError(f"{path} does not match its sha256 in engines.json; rebuild the engines")
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineManifestError(f"TensorRT could not deserialize {path}; rebuild the engines")
        strategy = self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        context = engine.create_execution_context(strategy)
        if context is None:
            raise CudaError(f"TensorRT could not create an execution context for {path} (out of GPU memory?)")
        size = max(engine.get_device_memory_size_for_profile_v2(i) for i in range(engine.num_optimization_profiles)) \
            if hasattr(engine, "get_device_memory_size_for_profile_v2") else engine.device_memory_size
        with self.lock:
            self.memory.attach(context, size)
        return TensorRTRunner(component, spec, engine_spec, engine, context, self)

    def close(self) -> None:
        with self.lock:
            self.memory.free()
            if self.stream:
                check_cuda(cudart().cudaStreamDestroy(self.stream))
                self.stream = 0
