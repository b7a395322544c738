"""Comparing an exported component with its PyTorch module on the same seeded inputs.

The parity run uses a size different from the trace size and batch 2, so a scale or shape
frozen at trace time shows up as a mismatch. Tolerances are per precision and measured, not
guessed: see docs/performance.md ("Export parity").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .components import Component

# Max relative error = max|ort - torch| / max|torch|, per output.
# fp32: the bound. fp16: ORT's fp16 kernels against PyTorch fp16 on CPU differ in
# accumulation order; measured up to ~2e-3 on the tiny presets, bound set at 1e-2.
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2}


@dataclass
class OutputParity:
    output: str
    max_abs_error: float
    max_rel_error: float
    cosine: float
    finite: bool


@dataclass
class ParityResult:
    component: str
    batch: int
    size: tuple[int, int]
    tolerance: float
    outputs: list[OutputParity]

    @property
    def passed(self) -> bool:
        return all(o.finite and o.max_rel_error <= self.tolerance for o in self.outputs)

    def summary(self) -> str:
        worst = max(self.outputs, key=lambda o: o.max_rel_error)
        status = "ok" if self.passed else "FAILED"
        where = "" if self.component.startswith("text_encoder") else f" {self.size[0]}x{self.size[1]}"
        return (f"{self.component}{where} batch {self.batch}: max rel error "
                f"{worst.max_rel_error:.2e} ({worst.output}), tolerance {self.tolerance:.0e} -> {status}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def compare_arrays(name: str, got: np.ndarray, expected: np.ndarray) -> OutputParity:
    got64, exp64 = got.astype(np.float64), expected.astype(np.float64)
    finite = bool(np.isfinite(got64).all())
    diff = np.abs(got64 - exp64)
    scale = max(np.abs(exp64).max(), 1e-30)
    denom = np.linalg.norm(got64) * np.linalg.norm(exp64)
    cosine = float((got64.ravel() @ exp64.ravel()) / denom) if denom else 1.0
    return OutputParity(name, float(diff.max()), float(diff.max() / scale), cosine, finite)


def check_parity(component: Component, onnx_path: Path, precision: str, batch: int = 2,
                 size: tuple[int, int] | None = None, providers: list[str] | None = None,
                 seed: int = 1) -> ParityResult:
    """Run PyTorch and ONNX Runtime on the same inputs; ``size`` defaults to a non-trace size."""
    import onnxruntime as ort

    size = size or parity_size(component)
    generator = torch.Generator().manual_seed(seed)
    inputs = component.make_inputs(batch, *size, generator)
    with torch.no_grad():
        expected = component.module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = ort.InferenceSession(str(onnx_path), providers=providers or ["CPUExecutionProvider"])
    feed = {spec.name: tensor.numpy() for spec, tensor in zip(component.inputs, inputs)}
    got = session.run([o.name for o in component.outputs], feed)
    outputs = [compare_arrays(spec.name, g, e.float().numpy())
               for spec, g, e in zip(component.outputs, got, expected)]
    return ParityResult(component.name, batch, size, TOLERANCES[precision], outputs)


def parity_size(component: Component) -> tuple[int, int]:
    """Swap and stretch the trace size: non-square, and different in both axes."""
    h, w = component.trace_size
    m = component.spatial_multiple
    return (w + m, h) if (w + m, h) != (h, w) else (w + 2 * m, h)
