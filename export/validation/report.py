"""What a validation run found: per-check results, the terminal table, the JSON report, the verdict."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .targets import BackendStatus
from ..comparison import OutputMetrics
from .end_to_end import EndToEndResult
from .localize import Localisation

REPORT_FORMAT = "linfusion-validation-report"


@dataclass
class CheckResult:
    component: str
    backend: str
    case: str
    label: str
    status: str
    """passed, failed, skipped or error."""
    outputs: list[OutputMetrics] = field(default_factory=list)
    reason: str = ""

    def worst(self) -> OutputMetrics | None:
        return max(self.outputs, key=lambda o: (not o.passed, o.max_rel_error), default=None)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "outputs": [o.to_dict() for o in self.outputs]}


@dataclass
class ValidationReport:
    export_dir: str
    precision: str
    reference: dict[str, Any]
    settings: dict[str, Any]
    tolerances: dict[str, Any]
    backends: list[BackendStatus] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)
    localisations: list[Localisation] = field(default_factory=list)
    end_to_end: list[EndToEndResult] = field(default_factory=list)
    checksums: dict[str, Any] = field(default_factory=dict)
    saved_reference: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status in ("failed", "error")]

    @property
    def passed(self) -> bool:
        ran = any(c.status == "passed" for c in self.checks) or self.end_to_end or self.saved_reference
        return bool(ran) and not self.failures and all(r.passed for r in self.end_to_end)

    def summary(self) -> str:
        skipped = "; ".join(f"{b.name} skipped: {b.reason}" for b in self.backends if not b.available)
        if self.passed:
            ran = [c for c in self.checks if c.status == "passed"]
            backends = sorted({c.backend for c in ran} | {r.backend for r in self.end_to_end})
            parts = [f"PASSED: {len(ran)} component checks" + (f" on {', '.join(backends)}" if backends else "")]
            if self.end_to_end:
                parts.append(", ".join(f"end-to-end {r.backend} PSNR {r.psnr:.1f} dB" for r in self.end_to_end))
            if self.saved_reference:
                parts.append(f"reference saved to {self.saved_reference[0]}")
            return "; ".join(parts + ([skipped] if skipped else []))
        parts = []
        groups: dict[tuple[str, str], list[CheckResult]] = {}
        for check in self.failures:
            groups.setdefault((check.component, check.backend), []).append(check)
        for (component, backend), failed in groups.items():
            total = sum(1 for c in self.checks if c.component == component and c.backend == backend)
            worst = max((c.worst() for c in failed if c.worst()), key=lambda o: o.max_rel_error, default=None)
            detail = f"; worst {worst.output} max rel error {worst.max_rel_error:.2e}" if worst else \
                f"; {failed[0].reason}"
            parts.append(f"{component} on {backend} ({len(failed)} of {total} cases{detail})")
        parts += [f"end-to-end on {r.backend} (PSNR {r.psnr:.1f} dB, max pixel diff {r.max_pixel_diff})"
                  for r in self.end_to_end if not r.passed]
        located = [loc.message() for loc in self.localisations if loc.first_divergent]
        return "FAILED: " + ", ".join(parts) + ("; " + "; ".join(located) if located else "")

    def table(self) -> str:
        header = ("component", "case", "backend", "output", "max abs", "max rel", "cosine", "outside", "result")
        rows = [header]
        for check in self.checks:
            if not check.outputs:
                rows.append((check.component, check.label, check.backend, "-", "", "", "", "",
                             f"{check.status.upper()}: {check.reason}"))
            for o in check.outputs:
                rows.append((check.component, check.label, check.backend, o.output, f"{o.max_abs_error:.2e}",
                             f"{o.max_rel_error:.2e}", f"{o.cosine:.6f}", f"{o.outside:.2%}",
                             "ok" if o.passed else ("FAILED" if o.finite else "FAILED (not finite)")))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(header) - 1)]
        lines = ["  ".join(str(v).ljust(w) for v, w in zip(r[:-1], widths)) + "  " + str(r[-1]) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        for status in self.backends:
            if not status.available:
                lines.append(f"{status.name}: skipped ({status.reason})")
        for loc in self.localisations:
            lines.append(f"{loc.component} on {loc.backend}: {loc.message()}")
            lines += [f"    {r.layer}: max rel error {r.max_rel_error:.2e}, cosine {r.cosine:.6f}"
                      f"{'' if r.passed else '  <- outside tolerance'}" for r in loc.layers]
        for r in self.end_to_end:
            verdict = "ok" if r.passed else f"FAILED{': ' + r.error if r.error else ''}"
            lines.append(f"end-to-end {r.backend} {r.size[0]}x{r.size[1]}, {r.steps} {r.scheduler} steps: "
                         f"PSNR {r.psnr:.2f} dB, max pixel diff {r.max_pixel_diff} -> {verdict}")
        if self.checksums.get("mismatched"):
            lines.append(f"checksums: {', '.join(self.checksums['mismatched'])} differ from the manifest "
                         f"(--checksums {self.checksums['mode']})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "passed": self.passed, "summary": self.summary(),
                "export_dir": self.export_dir, "precision": self.precision, "reference": self.reference,
                "settings": self.settings, "tolerances": self.tolerances,
                "backends": [asdict(b) for b in self.backends], "checks": [c.to_dict() for c in self.checks],
                "localisations": [loc.to_dict() for loc in self.localisations],
                "end_to_end": [r.to_dict() for r in self.end_to_end], "checksums": self.checksums,
                "saved_reference": self.saved_reference}

    def write(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_strict(self.to_dict()), indent=2, allow_nan=False) + "\n")


def _strict(value: Any) -> Any:
    """Plain JSON: numpy scalars as Python numbers, inf and nan as the strings "inf" and "nan"."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
