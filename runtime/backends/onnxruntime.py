"""ONNX Runtime backend: one InferenceSession per component, created once and shared by threads."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..contract import ComponentSpec
from ..manifest import ManifestError
from .base import Backend, ModelRunner

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider",
                       "CoreMLExecutionProvider", "CPUExecutionProvider")


def best_providers() -> list[str]:
    """The fastest available execution provider first; the CPU always last as the fallback.

    TensorRT's ORT provider is left out on purpose: our engines come from linfusion-build.
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in available]


class OnnxRuntimeRunner(ModelRunner):
    def __init__(self, name: str, spec: ComponentSpec, session) -> None:
        super().__init__(name, spec)
        self.session = session

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        feed = {name: np.ascontiguousarray(inputs[name], dtype=self.input_dtype(name))
                for name in self.input_names if name in inputs}
        return dict(zip(names, self.session.run(names, feed)))


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, providers: list[str] | None = None, intra_op_threads: int = 0) -> None:
        self.providers = providers or best_providers()
        self.intra_op_threads = intra_op_threads

    @classmethod
    def is_available(cls, export_dir: Path) -> bool:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False
        return True

    def load(self, export_dir: Path, component: str, spec: ComponentSpec) -> ModelRunner:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.intra_op_threads
        path = Path(export_dir) / spec.path
        try:
            session = ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types (InvalidProtobuf, Fail, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ManifestError(f"ONNX Runtime cannot load {component} ({path}): {first}; the file may be damaged: "
                                f"check it without --no-verify / verify=False, or re-export") from None
        return OnnxRuntimeRunner(component, spec, session)
