"""Comparing one run of a component with its reference: the single "compare with PyTorch" code.

Polygraphy's compare functions give the verdicts: an element-wise check whose absolute
tolerance is ``max_rel`` times the reference's largest magnitude (so one bound fits outputs of
any scale), and a cosine-similarity check. Polygraphy's own relative error is per element and
unbounded where the reference is near zero, so the reported relative error is scale-normalised
instead; the share of elements outside tolerance shows whether a failure is local or everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .tolerances import Tolerance


@dataclass
class OutputMetrics:
    output: str
    max_abs_error: float
    max_rel_error: float
    """max |got - ref| / max |ref|."""
    cosine: float
    outside: float
    """Share of elements with |got - ref| > max_rel * max |ref|."""
    finite: bool
    passed: bool
    mean_abs_error: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_outputs(reference: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
                    tolerance: Tolerance, names: list[str] | None = None) -> list[OutputMetrics]:
    """Compare ``got`` with ``reference`` output by output (``names`` default: the reference's)."""
    from polygraphy.comparator import IterationResult
    from polygraphy.comparator.compare import CosineSimilarityCompareFunc, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    names = list(names or reference)
    missing = [n for n in names if n not in got]
    if missing:
        raise KeyError(f"outputs missing from the run: {', '.join(missing)}")
    ref = {n: np.ascontiguousarray(reference[n]) for n in names}
    out = {n: np.ascontiguousarray(got[n]) for n in names}
    scales = {n: _scale(ref[n]) for n in names}
    atol = {n: tolerance.max_rel * scales[n] for n in names}
    got_iter = IterationResult(outputs=out, runner_name="backend")
    ref_iter = IterationResult(outputs=ref, runner_name="reference")
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        simple = SimpleCompareFunc(atol=atol, rtol=0.0, check_error_stat="elemwise")(got_iter, ref_iter)
        cosine = CosineSimilarityCompareFunc(cosine_similarity_threshold=tolerance.cosine)(got_iter, ref_iter)
    results = []
    for n in names:
        stats, cos = simple.get(n), cosine.get(n)
        finite = bool(np.isfinite(out[n].astype(np.float32, copy=False)).all())
        if stats is None or isinstance(stats, bool):  # polygraphy gives no statistics on a shape mismatch
            results.append(OutputMetrics(n, float("inf"), float("inf"), 0.0, 1.0, finite, False, float("inf")))
            continue
        diff = np.abs(out[n].astype(np.float64) - ref[n].astype(np.float64))
        outside = float(np.mean(~(diff <= atol[n]))) if diff.size else 0.0
        cos_value = float(cos.cosine_similarity) if cos is not None and not isinstance(cos, bool) else 0.0
        max_abs = float(stats.max_absdiff)
        results.append(OutputMetrics(
            n, max_abs, max_abs / scales[n], cos_value, outside, finite,
            bool(stats) and bool(cos) and finite, float(stats.mean_absdiff)))
    return results


def _scale(reference: np.ndarray) -> float:
    if reference.size == 0:
        return 1e-30
    return max(float(np.max(np.abs(reference.astype(np.float64)))), 1e-30)
