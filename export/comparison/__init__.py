"""Comparing a backend's outputs with a reference: metrics, per-precision tolerances, runners.

Shared by the export's parity check (``linfusion.export.parity``) and ``linfusion-validate``
(``linfusion.export.validation``); imports neither of them, nor torch.
"""

from .metrics import OutputMetrics, compare_outputs
from .runners import Feed, run_runner
from .tolerances import IMAGE_TOLERANCES, PRECISIONS, TOLERANCES, ImageTolerance, Tolerance, tolerance_for

__all__ = ["IMAGE_TOLERANCES", "PRECISIONS", "TOLERANCES", "Feed", "ImageTolerance", "OutputMetrics", "Tolerance",
           "compare_outputs", "run_runner", "tolerance_for"]
