"""Smoke tests: every benchmark study runs end to end in its --tiny mode and writes its files.

No timing is asserted: the numbers depend on the machine and its load (docs/performance.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
STUDIES = ("scaling", "end_to_end", "overhead", "cold_start", "memory")
PLOTS = {"scaling", "memory"}


def run_study(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "ignore", str(BENCHMARKS / f"{script}.py"), *args],
                          check=False, capture_output=True, text=True, timeout=timeout, cwd=BENCHMARKS.parent)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One tiny model, export and diffusers folder shared by every study (built by the first)."""
    return tmp_path_factory.mktemp("bench-assets")


@pytest.mark.parametrize("study", STUDIES)
def test_study_runs_in_tiny_mode(study: str, workdir: Path, tmp_path: Path) -> None:
    done = run_study(study, "--tiny", "--workdir", str(workdir), "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / f"{study}.json").read_text())
    assert record["study"] == study and record["machine"]["cores"]
    assert "| " in (tmp_path / f"{study}.md").read_text()
    if study in PLOTS:
        assert 0 < (tmp_path / f"{study}.png").stat().st_size < 200_000


def test_gpu_script_explains_itself_without_a_gpu() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible; gpu_unet.py would run the real measurement")
    done = run_study("gpu_unet")
    assert done.returncode == 2 and "no CUDA GPU" in done.stdout


def test_exponent_and_crossover_helpers() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import harness
    finally:
        sys.path.remove(str(BENCHMARKS))
    pixels = [1e4, 4e4, 1.6e5, 6.4e5]
    assert harness.fit_exponent(pixels, [p**1.5 for p in pixels]) == pytest.approx(1.5)
    assert harness.crossover([256, 512, 1024], [2.0, 1.0, 1.0], [1.0, 1.0, 4.0])["where"] == "inside"
    assert harness.crossover([256, 512], [1.0, 1.0], [2.0, 2.0])["where"] == "below_range"
