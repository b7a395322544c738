"""The peak resident memory of linfusion-generate in a fresh process."""

import os
import subprocess
import sys
from pathlib import Path

# The CLI under a wrapper that writes the process's VmHWM at exit: ru_maxrss from wait4 would not do,
# since Linux carries the forking process's peak (this pytest process, with torch) over exec.
PEAK_WRAPPER = """
import atexit, runpy, sys
record = sys.argv.pop(1)
def peak():
    with open(record, "w") as out:
        out.write(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
atexit.register(peak)
runpy.run_module("linfusion.runtime.cli", run_name="__main__", alter_sys=True)
"""


def peak_rss_of_cli(args: list[str], record: Path, env: dict[str, str] | None = None) -> int:
    """Run linfusion-generate in a fresh process (``env`` added to the environment); its peak resident
    set size in bytes."""
    result = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, str(record), *args], capture_output=True,
                            text=True, timeout=600, check=False, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return int(record.read_text()) * 1024
