"""Choosing a backend: TensorRT engines when present and importable, else ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

from .base import Backend
from .onnxruntime import OnnxRuntimeBackend, arena_environment

BACKENDS = ("auto", "onnxruntime", "tensorrt")


class BackendError(RuntimeError):
    """The requested backend cannot run this export here."""


def load_backend(name: str, export_dir: Path, providers: list[str] | None = None,
                 intra_op_threads: int = 0, provider_options: dict | None = None, io_binding: bool = True,
                 session_options: dict | None = None) -> Backend:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend '{name}'; choose one of {', '.join(BACKENDS)}")
    if name in ("auto", "tensorrt"):
        from .tensorrt import TensorRTBackend

        if TensorRTBackend.is_available(export_dir):
            return TensorRTBackend()
        if name == "tensorrt":
            try:
                TensorRTBackend.load_libraries()
            except ImportError as exc:
                raise BackendError(f"the TensorRT backend is unavailable: {exc}") from None
            raise BackendError(f"no usable TensorRT engines for {export_dir}: build them with "
                               f"`linfusion-build {export_dir}` on a machine with TensorRT")
    try:
        arena_environment()
    except ValueError as exc:
        raise BackendError(str(exc)) from None
    return OnnxRuntimeBackend(providers=providers, intra_op_threads=intra_op_threads,
                              provider_options=provider_options, io_binding=io_binding,
                              session_options=session_options)
