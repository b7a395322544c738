"""Wall time and peak memory (RSS) of one `linfusion-export` run, e.g. real-size SD-XL in fp16.

    python benchmarks/export_cost.py --model sdxl --random-weights --precision fp16 [--skip-parity]

Runs the CLI in a child process so that its peak RSS is measured alone, then prints a markdown
row and writes JSON beside the export (benchmarks/results/export_cost.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--keep", help="keep the export here instead of a temporary folder")
    p.add_argument("--results", default=str(Path(__file__).parent / "results" / "export_cost.json"))
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="export-cost-"))
    output = Path(args.keep) if args.keep else workdir / "out"
    command = [sys.executable, "-m", "linfusion.export.cli", "--model", args.model, "--precision",
               args.precision, "--output", str(output), "--force"]
    command += ["--random-weights"] * args.random_weights + ["--skip-parity"] * args.skip_parity
    start = time.perf_counter()
    completed = subprocess.run(command)
    wall = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    size_gib = sum(f.stat().st_size for f in output.rglob("*") if f.is_file()) / 2**30 if output.exists() else 0
    shutil.rmtree(workdir, ignore_errors=True)
    record = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor()}",
              "cpus": os.cpu_count(), "command": " ".join(command[2:]),
              "exit_code": completed.returncode, "wall_s": round(wall, 1), "peak_rss_gib": round(peak_gib, 2),
              "export_size_gib": round(size_gib, 2)}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(record, indent=2) + "\n")
    print(f"| {args.model} | {args.precision} | {'yes' if args.skip_parity else 'no'} | {wall:.0f} s "
          f"| {peak_gib:.1f} GiB | {size_gib:.1f} GiB |")
    return completed.returncode


if __name__ == "__main__":
    sys.exit(main())
