"""The interface every inference backend implements: load, check shapes, run.

A ``ModelRunner`` holds one loaded component (created once per pipeline, never per call) and
is safe to call from several threads at once: ``run`` sets whatever per-call shape state the
backend needs itself. ``check_shapes`` lets the pipeline reject a request before any heavy
work, for example a size outside a TensorRT engine's optimization profiles.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..contract import ComponentSpec


class ShapeError(ValueError):
    """A requested input shape that the loaded model cannot run."""


class ModelRunner(ABC):
    """One loaded model component with named inputs and outputs."""

    def __init__(self, name: str, spec: ComponentSpec) -> None:
        self.name = name
        self.spec = spec

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.spec.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.spec.outputs]

    def input_dtype(self, name: str) -> np.dtype:
        return np.dtype(self.spec.input(name).dtype)

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise ShapeError if these input shapes cannot run; static dims are checked here."""
        for spec in self.spec.inputs:
            shape = shapes.get(spec.name)
            if shape is None:
                continue
            if len(shape) != len(spec.shape) or any(
                    isinstance(want, int) and want != got for want, got in zip(spec.shape, shape)):
                raise ShapeError(f"{self.name}: input '{spec.name}' has shape {tuple(shape)}, "
                                 f"the model takes {spec.shape}")

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run once; thread-safe. Returns the requested (default: all) outputs by name."""

    def bind(self, constants: dict[str, np.ndarray]) -> BoundRunner:
        """A runner for a loop whose ``constants`` stay the same every call (the text conditioning
        of a denoising loop): a backend that can keeps them on its device. One per loop (thread)."""
        return BoundRunner(self, constants)

    def close(self) -> None:
        """Release device resources; the runner is unusable afterwards."""


class BoundRunner:
    """``ModelRunner.bind``'s result: ``run`` takes only the inputs that change per call."""

    def __init__(self, runner: ModelRunner, constants: dict[str, np.ndarray]) -> None:
        self.runner = runner
        self.constants = constants

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None,
            output_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
        """``output_shapes`` (optional) lets a device backend reuse an output buffer across calls."""
        return self.runner.run({**self.constants, **inputs}, outputs)

    def batch(self, name: str) -> int:
        """The batch size of a bound constant (its first dimension)."""
        return int(self.constants[name].shape[0])


class Backend(ABC):
    """Creates ModelRunners for the components of one export directory."""

    name: str

    @classmethod
    @abstractmethod
    def is_available(cls, export_dir: Path) -> bool:
        """Whether this backend can run this export here (library importable, artifacts present)."""

    @abstractmethod
    def load(self, export_dir: Path, component: str, spec: ComponentSpec) -> ModelRunner:
        """Load one component (session or engine); called once per component per pipeline."""

    def shares_cpu_arena(self) -> bool:
        """Whether the components share one host memory arena (the memory guard then counts the
        largest stage, not the sum)."""
        return False
