"""Shared pieces of the benchmark studies: machine facts, interleaved timing, fits, result files.

Every study records the machine, the command and the date next to its numbers, takes medians
over repeats that alternate between the compared sides (so a load change on a shared machine
hits both sides alike), and writes ``results/<study>.json`` plus a markdown table.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "onnxruntime", "diffusers", "numpy")


def machine() -> dict[str, Any]:
    """What the numbers were measured on, including the load average at the start (shared CPUs)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem_kib = 0
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"cpu": cpu, "arch": platform.machine(), "cores": os.cpu_count(),
            "memory_gib": round(mem_kib / 2**20, 1), "python": platform.python_version(),
            "packages": versions, "gpu": "none", "load_average_at_start": list(os.getloadavg())}


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def interleaved(cases: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call for each case; warm-up calls first, then rounds that visit every case once."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def fit_exponent(pixels: Sequence[float], seconds: Sequence[float], span: float = 4.0) -> float | None:
    """Least-squares slope of log(time) against log(pixels) over the top ``span``x of the pixel range."""
    top = max(pixels)
    points = [(p, t) for p, t in zip(pixels, seconds) if p >= top / span * (1 - 1e-9) and t > 0]
    if len(points) < 2:
        return None
    x, y = np.log([p for p, _ in points]), np.log([t for _, t in points])
    return float(np.polyfit(x, y, 1)[0])


def crossover(sizes: Sequence[int], linear: Sequence[float], softmax: Sequence[float]) -> dict[str, Any]:
    """The side length from which linear attention stays faster, interpolated in log-log.

    ``below_range`` when it already wins at the smallest size, ``above_range`` when it never does.
    """
    wins = [lin < soft for lin, soft in zip(linear, softmax)]
    if all(wins):
        return {"side_px": None, "where": "below_range", "at_most_px": sizes[0]}
    if not wins[-1]:
        return {"side_px": None, "where": "above_range", "at_least_px": sizes[-1]}
    first = max(i for i, won in enumerate(wins) if not won) + 1
    a, b = first - 1, first
    ratio_a, ratio_b = np.log(linear[a] / softmax[a]), np.log(linear[b] / softmax[b])
    frac = ratio_a / (ratio_a - ratio_b)
    side = float(np.exp(np.log(sizes[a]) + frac * (np.log(sizes[b]) - np.log(sizes[a]))))
    return {"side_px": round(side), "where": "inside", "between_px": [sizes[a], sizes[b]]}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "–" if value is None else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(study: str, record: dict[str, Any], table: str, notes: Sequence[str] = (),
                  results: Path = RESULTS) -> Path:
    """``<study>.json`` (everything) and ``<study>.md`` (machine, command, date, table, notes)."""
    results.mkdir(parents=True, exist_ok=True)
    record = {"study": study, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": command_line(), "machine": machine(), **record}
    (results / f"{study}.json").write_text(json.dumps(record, indent=2) + "\n")
    m = record["machine"]
    header = (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, no GPU; "
              f"load average at start {m['load_average_at_start'][0]:.1f}; "
              + ", ".join(f"{k} {v}" for k, v in m["packages"].items()))
    text = "\n\n".join([f"### {study} ({record['date'][:10]})", f"Command: `{record['command']}`",
                        header, table, *notes]) + "\n"
    path = results / f"{study}.md"
    path.write_text(text)
    print(text)
    return path


def loglog_plot(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str,
                ylabel: str, xlabel: str = "pixels (height x width)") -> Path:
    """A small log-log PNG (Agg backend, 80 dpi, well under 200 KB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    for label, (x, y) in series.items():
        ax.loglog(x, y, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def child_json(stdout: str) -> dict[str, Any]:
    """The last line of a child process's output that is a JSON object (its result)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON result in child output:\n{stdout[-2000:]}")
