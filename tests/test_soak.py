"""Soak: one ``Pipeline`` serving 200 mixed generations from 4 threads keeps its memory.

Runs ``benchmarks/soak.py`` in a child process (the full 200 generations take about 10-20 s on
a 2-core machine) on the session's tiny-sd export, and checks the child the same way with a
deliberate leak, so that the 5 % bound is known to catch one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
LEAK_KIB = 128  # per generation: 180 generations after the warm-up retain 22.5 MiB

_LEAKY = textwrap.dedent(f"""
    import os, runpy, sys
    from linfusion.runtime import pipeline
    kept, call = [], pipeline.Pipeline.__call__
    def leaky(self, *args, **kwargs):
        kept.append(os.urandom({LEAK_KIB} * 1024))  # random bytes: every page is resident
        return call(self, *args, **kwargs)
    pipeline.Pipeline.__call__ = leaky
    sys.path.insert(0, os.path.dirname(sys.argv[1]))
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def run_soak(export: Path, results: Path, leak: bool = False) -> tuple[subprocess.CompletedProcess, dict]:
    prefix = ["-c", _LEAKY] if leak else []
    done = subprocess.run([sys.executable, "-W", "ignore", *prefix, str(SOAK), "--export", str(export),
                           "--generations", "200", "--threads", "4", "--results", str(results)],
                          check=False, capture_output=True, text=True, timeout=600, cwd=SOAK.parents[1])
    path = results / "soak.json"
    assert path.exists(), done.stderr[-3000:]
    return done, json.loads(path.read_text())


@pytest.mark.slow
def test_200_generations_from_4_threads_grow_rss_by_less_than_5_percent(exported, tmp_path):
    done, record = run_soak(exported("tiny-sd"), tmp_path)
    assert record["generations"] == 200 and record["threads"] == 4 and record["warmup"] == 20
    assert not record["torch_imported"]
    assert [s["generations"] for s in record["samples"]] == list(range(0, 201, 20))
    growth = 100 * (record["rss_end_mib"] - record["rss_after_warmup_mib"]) / record["rss_after_warmup_mib"]
    assert growth == pytest.approx(record["growth_percent"], abs=0.1)  # from values rounded to 0.1 MiB
    assert growth < 5, done.stdout
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.slow
def test_the_soak_catches_a_leak(exported, tmp_path):
    done, record = run_soak(exported("tiny-sd"), tmp_path, leak=True)
    leaked_mib = LEAK_KIB * (record["generations"] - record["warmup"]) / 1024
    assert record["rss_end_mib"] - record["rss_after_warmup_mib"] > 0.8 * leaked_mib
    assert record["growth_percent"] >= 5 and done.returncode == 1, done.stdout
    assert done.stdout.strip().endswith("FAILED")
