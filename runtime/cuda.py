"""CUDA and TensorRT plumbing shared by the TensorRT backend and the engine builder (cuda-python only).

TensorRT and cuda-python are imported on first use, so this module imports everywhere.
"""

from __future__ import annotations


class TensorRTUnavailable(ImportError):
    """TensorRT (or cuda-python) is not installed here; the message says what to install."""


def import_tensorrt(need: str = "Runtime"):
    """TensorRT, checked for the class a caller needs (``Runtime`` to run, ``Builder`` to build);
    otherwise TensorRTUnavailable with a one-line remedy."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT is not installed ({exc}): pip install 'linfusion-deploy[gpu]' "
                                  f"(CUDA 12) or '[gpu-cu13]' on a machine with an NVIDIA GPU") from None
    if not hasattr(trt, need):
        raise TensorRTUnavailable("the installed `tensorrt` package is a stub without its libraries; install "
                                  "the full TensorRT wheel (tensorrt-cu12 or tensorrt-cu13)")
    return trt


class CudaError(RuntimeError):
    """A CUDA runtime call failed."""


def cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime  # cuda-python < 12.6
    return runtime


def check_cuda(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise CudaError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else (rest or None)


def driver_cuda_version() -> tuple[int, int]:
    """The newest CUDA version the installed driver supports, e.g. (12, 4)."""
    version = int(check_cuda(cudart().cudaDriverGetVersion()))
    return version // 1000, version % 1000 // 10


def current_gpu() -> tuple[str, str]:
    """(name, "major.minor") of CUDA device 0."""
    props = check_cuda(cudart().cudaGetDeviceProperties(0))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"


class DeviceBuffer:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check_cuda(cudart().cudaMalloc(self.nbytes)))

    def free(self) -> None:
        if self.ptr:
            check_cuda(cudart().cudaFree(self.ptr))
            self.ptr = 0


_LOGGERS: dict[int, object] = {}


def tensorrt_logger(trt):
    """The process's one TensorRT logger: TensorRT keeps the first logger a builder or runtime
    was given and warns about any other (the engine builder uses this one too)."""
    if id(trt) not in _LOGGERS:
        _LOGGERS[id(trt)] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[id(trt)]
