"""The export's parity check: one component, one size, through the validation comparison code.

``linfusion-export`` calls ``check_parity`` at a size different from the trace size and batch 2,
so a scale or shape frozen at trace time shows up as a mismatch. Inputs, the ONNX Runtime run
(a polygraphy runner) and the comparison are the ones ``linfusion-validate`` uses, and the
bounds are its per-precision table (docs/validation.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .components import Component
from .comparison import OutputMetrics, compare_outputs, run_runner, tolerance_for
from .comparison import TOLERANCES as VALIDATION_TOLERANCES

# Bound on max |ort - torch| / max |torch| per precision (kept as floats for callers that read them).
TOLERANCES = {precision: t.max_rel for precision, t in VALIDATION_TOLERANCES.items()}

OutputParity = OutputMetrics


@dataclass
class ParityResult:
    component: str
    batch: int
    size: tuple[int, int] | None
    """None for components without spatial axes (text encoders)."""
    tolerance: float
    outputs: list[OutputMetrics]
    cosine_tolerance: float = 0.0

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def summary(self) -> str:
        worst = max(self.outputs, key=lambda o: (not o.passed, o.max_rel_error))
        status = "ok" if self.passed else "FAILED"
        where = "" if self.size is None else f" {self.size[0]}x{self.size[1]}"
        return (f"{self.component}{where} batch {self.batch}: max rel error "
                f"{worst.max_rel_error:.2e} ({worst.output}), tolerance {self.tolerance:.0e} -> {status}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def compare_arrays(name: str, got: np.ndarray, expected: np.ndarray, precision: str = "fp32") -> OutputMetrics:
    """One output against its reference, with ``precision``'s bounds deciding ``passed``."""
    return compare_outputs({name: expected}, {name: got}, tolerance_for(precision))[0]


def check_parity(component: Component, onnx_path: Path, precision: str, batch: int = 2,
                 size: tuple[int, int] | None = None, providers: list[str] | None = None,
                 seed: int = 1) -> ParityResult:
    """Run PyTorch and ONNX Runtime on the same inputs; ``size`` defaults to a non-trace size."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    size = size or parity_size(component)
    tolerance = tolerance_for(precision)
    inputs = component.make_inputs(batch, *size, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = component.module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    feed = {spec.name: tensor.numpy() for spec, tensor in zip(component.inputs, inputs)}
    runner = OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=providers or ["CPUExecutionProvider"]),
                          name="onnxruntime")
    got = run_runner(runner, [feed])[0]
    reference = {spec.name: e.float().numpy() if e.dtype == torch.bfloat16 else e.numpy()
                 for spec, e in zip(component.outputs, expected)}
    outputs = compare_outputs(reference, got, tolerance)
    return ParityResult(component.name, batch, size if component.kind.spatial else None, tolerance.max_rel, outputs,
                        tolerance.cosine)


def parity_size(component: Component) -> tuple[int, int]:
    """Swap and stretch the trace size: non-square, and different in both axes."""
    h, w = component.trace_size
    m = component.spatial_multiple
    return (w + m, h) if (w + m, h) != (h, w) else (w + 2 * m, h)
