"""``linfusion-validate``: evidence that exported models and engines compute what PyTorch computes.

Import-light and torch-free: PyTorch is loaded only when the reference is computed, never when
a run compares against a saved reference file.
"""

from ..comparison import (
    IMAGE_TOLERANCES,
    TOLERANCES,
    ImageTolerance,
    OutputMetrics,
    Tolerance,
    compare_outputs,
    tolerance_for,
)
from .validate import Options, ValidationInputError, validate

__all__ = ["IMAGE_TOLERANCES", "TOLERANCES", "ImageTolerance", "Options", "OutputMetrics", "Tolerance",
           "ValidationInputError", "compare_outputs", "tolerance_for", "validate"]
