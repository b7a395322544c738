"""Soak of one running linfusion-serve: mixed requests over HTTP keep the server's RSS (issue 12).

Runs ``benchmarks/soak.py --server`` (a child process starting the real server on 127.0.0.1) on
the session's tiny-sd export with 60 requests, a shorter version of the 200 measured in
docs/serving.md; growth is counted after the warm-up's 20.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("httpx", reason="the serve extra (httpx) is not installed")
pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


@pytest.mark.slow
def test_a_server_keeps_its_memory_over_mixed_requests(exported, tmp_path):
    done = subprocess.run([sys.executable, "-W", "ignore", str(SOAK), "--server", "--export",
                           str(exported("tiny-sd")), "--generations", "60", "--threads", "4", "--results",
                           str(tmp_path)], check=False, capture_output=True, text=True, timeout=600,
                          cwd=SOAK.parents[1])
    record = json.loads((tmp_path / "soak_server.json").read_text())
    assert record["server"] and record["generations"] == 60 and record["warmup"] == 20
    assert record["error_count"] == 0, record["errors"]
    assert record["server_exit_code"] == 0  # SIGTERM drained it
    assert len(record["samples"]) == 4 and all(s["rss_mib"] > 50 for s in record["samples"])
    assert record["growth_percent"] < 5, record["samples"]
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
