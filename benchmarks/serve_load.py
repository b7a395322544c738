"""Load test of linfusion-serve: N concurrent HTTP clients, throughput and latency percentiles.

For each ``--max-batch`` value it starts ``linfusion-serve EXPORT`` on 127.0.0.1 (a free port),
warms it up, sends ``--requests`` OpenAI-style requests from ``--clients`` threads (each its own
httpx client, distinct prompts and seeds, one image each), and records throughput, p50/p95/p99
latency, errors by status, the mean batch the server ran (from /metrics) and the server's RSS
before and after the run. ``--url`` measures an already running server instead (loopback only).
Everything is bounded: a request count, a per-configuration time limit, a per-request timeout.

    python benchmarks/serve_load.py --export /tmp/tiny-sd --max-batch 1 4
    (a tiny export: linfusion-export --model tiny-sd --random-weights --output /tmp/tiny-sd)

Writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, command_line, machine

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--export", help="export directory: servers are started on it, one per --max-batch")
    where.add_argument("--url", help="a running server on a loopback address (http://127.0.0.1:PORT)")
    p.add_argument("--max-batch", type=int, nargs="+", default=[1, 4], help="server --max-batch values compared")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="server --batch-wait-ms")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--requests", type=int, default=48, help="measured requests per configuration")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured requests first (sequential)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--scheduler", default="euler")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds per configuration at most")
    p.add_argument("--request-timeout", type=float, default=300.0, help="client timeout per request")
    p.add_argument("--threads", type=int, default=0, help="server ONNX Runtime threads (0: default)")
    p.add_argument("--output", default=str(RESULTS / "serve_load.json"))
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return round(int(found.group(1)) / 1024, 1) if found else None


def metric_sum_count(text: str, name: str) -> tuple[float, float]:
    total = re.search(rf"^{name}_sum (\S+)$", text, re.MULTILINE)
    count = re.search(rf"^{name}_count (\S+)$", text, re.MULTILINE)
    return (float(total.group(1)) if total else 0.0, float(count.group(1)) if count else 0.0)


def start_server(export: str, max_batch: int, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "linfusion.serve.cli", export, "--port", str(port), "--max-batch",
               str(max_batch), "--batch-wait-ms", str(args.batch_wait_ms), "--max-queue", str(4 * args.clients),
               "--request-timeout", str(args.request_timeout), "--threads", str(args.threads)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server not ready within 300 s")


def stop_server(proc: subprocess.Popen) -> int | None:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return None


def body(i: int, args: argparse.Namespace) -> dict[str, Any]:
    return {"prompt": f"test image {i}: a lighthouse on a cliff, variant {i % 7}", "seed": 1000 + i,
            "size": f"{args.size}x{args.size}", "num_inference_steps": args.steps, "scheduler": args.scheduler}


def load(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Send ``--requests`` requests from ``--clients`` threads; latencies and statuses."""
    import httpx

    with httpx.Client(base_url=url, timeout=args.request_timeout) as c:
        for i in range(args.warmup):
            c.post("/v1/images/generations", json=body(-1 - i, args)).raise_for_status()
        before = c.get("/metrics").text
    lock = threading.Lock()
    counter = iter(range(args.requests))
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + args.time_limit

    def client() -> None:
        with httpx.Client(base_url=url, timeout=args.request_timeout) as c:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                try:
                    status = str(c.post("/v1/images/generations", json=body(i, args)).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                seconds = time.perf_counter() - start
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == "200":
                        latencies.append(seconds)

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.time_limit + args.request_timeout)
    wall = time.perf_counter() - start
    after = httpx.get(url + "/metrics", timeout=30).text
    batch_sum = [a - b for a, b in zip(metric_sum_count(after, "linfusion_batch_size"),
                                       metric_sum_count(before, "linfusion_batch_size"))]
    ok = len(latencies)
    pct = (lambda q: round(float(np.percentile(latencies, q)), 3)) if latencies else (lambda q: None)
    return {"requests": sum(statuses.values()), "ok": ok, "errors": {k: v for k, v in statuses.items() if k != "200"},
            "wall_s": round(wall, 2), "throughput_rps": round(ok / wall, 3) if wall else None,
            "latency_s": {"p50": pct(50), "p95": pct(95), "p99": pct(99),
                          "mean": round(float(np.mean(latencies)), 3) if latencies else None},
            "mean_batch": round(batch_sum[0] / batch_sum[1], 2) if batch_sum[1] else None,
            "batches": int(batch_sum[1])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = []
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            print("serve_load: error: --url must be a loopback address (127.0.0.1, localhost or ::1)",
                  file=sys.stderr)
            return 2
        runs.append({"max_batch": None, "url": args.url, **load(args.url, args)})
    else:
        logs = Path(tempfile.mkdtemp(prefix="serve_load_"))
        for max_batch in args.max_batch:
            proc, url = start_server(args.export, max_batch, args, logs / f"server-{max_batch}.log")
            try:
                rss_start = rss_mib(proc.pid)
                result = load(url, args)
                rss_end = rss_mib(proc.pid)
            finally:
                code = stop_server(proc)
            runs.append({"max_batch": max_batch, "batch_wait_ms": args.batch_wait_ms, **result,
                         "server_rss_mib": {"after_warmup": rss_start, "after_run": rss_end},
                         "server_exit_code": code})
            print(json.dumps(runs[-1]), flush=True)
    record = {"study": "serve_load", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command_line(),
              "machine": machine(), "export": args.export,
              "settings": {k: getattr(args, k) for k in ("clients", "requests", "warmup", "size", "steps",
                                                         "scheduler", "batch_wait_ms", "threads")},
              "runs": runs}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")
    for run in runs:
        print(f"max_batch {run['max_batch']}: {run['throughput_rps']} req/s, p50 {run['latency_s']['p50']} s, "
              f"p95 {run['latency_s']['p95']} s, p99 {run['latency_s']['p99']} s, mean batch {run['mean_batch']}, "
              f"errors {run['errors'] or 0}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
