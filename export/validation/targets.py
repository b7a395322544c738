"""The backends under test ("targets", not to be confused with the runtime's backends), driven through polygraphy's runners and Comparator.

ONNX Runtime always runs; TensorRT runs when ``tensorrt`` imports and ``linfusion-build`` left
engines in the export directory, and is otherwise reported as skipped with the reason. Neither
path imports torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from linfusion.runtime.engine_manifest import EngineManifestError, engines_dir, load_engine_manifest
from linfusion.runtime.manifest import Manifest

from ..comparison import Feed, run_runner

BACKENDS = ("onnxruntime", "tensorrt")

Outcome = dict[str, np.ndarray] | str
"""A run's outputs by name, or the reason this feed was skipped."""


class UnknownTargetError(ValueError):
    """An unknown backend name."""


@dataclass
class BackendStatus:
    name: str
    available: bool
    reason: str | None = None


def parse_backends(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise UnknownTargetError(f"unknown backend(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(BACKENDS)}")
    return names


class OnnxRuntimeTarget:
    name = "onnxruntime"

    def __init__(self, export_dir: Path, manifest: Manifest, providers: list[str] | None = None) -> None:
        from linfusion.runtime.backends.onnxruntime import best_providers

        self.export_dir = export_dir
        self.manifest = manifest
        self.providers = providers or best_providers()

    @staticmethod
    def status(export_dir: Path) -> BackendStatus:
        if importlib.util.find_spec("onnxruntime") is None:
            return BackendStatus("onnxruntime", False, "onnxruntime is not installed")
        return BackendStatus("onnxruntime", True)

    def runner(self, path: Path):
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

        return OnnxrtRunner(SessionFromOnnx(str(path), providers=self.providers), name=self.name)

    def run(self, component: str, feeds: Sequence[Feed]) -> list[Outcome]:
        return run_runner(self.runner(self.export_dir / self.manifest.components[component].path), feeds)


class TensorRTTarget:
    name = "tensorrt"

    def __init__(self, export_dir: Path, manifest: Manifest) -> None:
        self.export_dir = export_dir
        self.engines = load_engine_manifest(engines_dir(export_dir))
        self._loaded: dict[str, object] = {}

    @staticmethod
    def status(export_dir: Path) -> BackendStatus:
        if importlib.util.find_spec("tensorrt") is None:
            return BackendStatus("tensorrt", False, "TensorRT is not importable here (it needs an NVIDIA GPU "
                                                    "and `pip install tensorrt`)")
        try:
            load_engine_manifest(engines_dir(export_dir))
        except EngineManifestError as exc:
            return BackendStatus("tensorrt", False, str(exc))
        return BackendStatus("tensorrt", True)

    def has(self, component: str) -> bool:
        return component in self.engines.components

    def run(self, component: str, feeds: Sequence[Feed]) -> list[Outcome]:
        """Feeds are grouped by the optimization profile that admits their shapes."""
        from polygraphy.backend.trt import TrtRunner

        spec = self.engines.components.get(component)
        if spec is None:
            return [f"no TensorRT engine for {component}"] * len(feeds)
        engine = self._engine(component, spec)
        outcomes: list[Outcome] = [""] * len(feeds)
        groups: dict[int, list[int]] = {}
        for i, feed in enumerate(feeds):
            index = spec.profile_index({name: tuple(a.shape) for name, a in feed.items()})
            if index is None:
                profiles = " | ".join(p.describe() for p in spec.profiles)
                outcomes[i] = f"shapes outside the engine's profiles ({profiles})"
            else:
                groups.setdefault(index, []).append(i)
        for index, members in groups.items():
            runner = TrtRunner(engine, name=f"{self.name}-profile{index}", optimization_profile=index)
            for i, result in zip(members, run_runner(runner, [feeds[i] for i in members])):
                outcomes[i] = result
        return outcomes

    def _engine(self, component: str, spec):
        if component not in self._loaded:
            from polygraphy.backend.trt import EngineFromPath

            if spec.plugin and importlib.util.find_spec("linfusion.engines.plugin") is not None:
                importlib.import_module("linfusion.engines.plugin")  # registers the plugin with TensorRT
            self._loaded[component] = EngineFromPath(str(engines_dir(self.export_dir) / spec.engine))()
        return self._loaded[component]


def backend_status(name: str, export_dir: Path) -> BackendStatus:
    return (OnnxRuntimeTarget if name == "onnxruntime" else TensorRTTarget).status(export_dir)
