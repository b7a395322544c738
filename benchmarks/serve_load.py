"""Load test of linfusion-serve: N concurrent HTTP clients, throughput and latency percentiles.

It starts one ``linfusion-serve EXPORT`` per ``--max-batch`` value on 127.0.0.1 (free ports) and,
for each ``--size``, warms them up, then lets them take turns for ``--rounds`` rounds (so that the
load of a shared machine hits every setting alike), each round sending its share of ``--requests``
OpenAI-style requests from ``--clients`` threads (each its own httpx client; distinct prompts and
seeds, one image each). It records throughput, p50/p95/p99 latency, errors by status, the mean
batch the server ran (from /metrics) and the server's RSS before and after. ``--url`` measures an
already running server instead (loopback only). Everything is bounded: request counts, a time
limit per burst, a per-request timeout.

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
    p.add_argument("--rounds", type=int, default=3, help="turns the compared servers take (requests split evenly)")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured requests first (sequential)")
    p.add_argument("--size", type=int, nargs="+", default=[64], help="image sides in pixels (each measured)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--scheduler", default="euler")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds per burst (one round, one server) at most")
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


def body(i: int, size: int, args: argparse.Namespace) -> dict[str, Any]:
    return {"prompt": f"test image {i}: a lighthouse on a cliff, variant {i % 7}", "seed": 1000 + i,
            "size": f"{size}x{size}", "num_inference_steps": args.steps, "scheduler": args.scheduler}


def warm(url: str, size: int, args: argparse.Namespace) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=args.request_timeout) as c:
        for i in range(args.warmup):
            c.post("/v1/images/generations", json=body(-1 - i, size, args)).raise_for_status()


def burst(url: str, size: int, count: int, first: int, args: argparse.Namespace) -> dict[str, Any]:
    """``count`` requests from ``--clients`` threads: latencies, statuses, wall time, batch metrics."""
    import httpx

    before = httpx.get(url + "/metrics", timeout=30).text
    lock = threading.Lock()
    counter = iter(range(first, first + count))
    out: dict[str, Any] = {"latencies": [], "statuses": {}}
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
                    status = str(c.post("/v1/images/generations", json=body(i, size, args)).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                seconds = time.perf_counter() - start
                with lock:
                    out["statuses"][status] = out["statuses"].get(status, 0) + 1
                    if status == "200":
                        out["latencies"].append(seconds)

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.time_limit + args.request_timeout)
    out["wall"] = time.perf_counter() - start
    after = httpx.get(url + "/metrics", timeout=30).text
    out["batch"] = [a - b for a, b in zip(metric_sum_count(after, "linfusion_batch_size"),
                                          metric_sum_count(before, "linfusion_batch_size"))]
    return out


def summary(bursts: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [x for b in bursts for x in b["latencies"]]
    statuses: dict[str, int] = {}
    for b in bursts:
        for k, v in b["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    wall = sum(b["wall"] for b in bursts)
    batch_sum, batch_count = (sum(b["batch"][i] for b in bursts) for i in (0, 1))

    def pct(q: float) -> float | None:
        return round(float(np.percentile(latencies, q)), 3) if latencies else None

    return {"requests": sum(statuses.values()), "ok": len(latencies),
            "errors": {k: v for k, v in statuses.items() if k != "200"}, "wall_s": round(wall, 2),
            "throughput_rps": round(len(latencies) / wall, 3) if wall else None,
            "throughput_rps_per_round": [round(len(b["latencies"]) / b["wall"], 3) for b in bursts],
            "latency_s": {"p50": pct(50), "p95": pct(95), "p99": pct(99),
                          "mean": round(float(np.mean(latencies)), 3) if latencies else None},
            "mean_batch": round(batch_sum / batch_count, 2) if batch_count else None, "batches": int(batch_count)}


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("fastapi", "starlette", "uvicorn", "prometheus-client", "httpx", "uvloop", "httptools"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = []
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        print("serve_load: error: --url must be a loopback address (127.0.0.1, localhost or ::1)", file=sys.stderr)
        return 2
    servers: dict[Any, tuple[subprocess.Popen | None, str]] = {}
    try:
        if args.url:
            servers[None] = (None, args.url)
        else:
            logs = Path(tempfile.mkdtemp(prefix="serve_load_"))
            for max_batch in args.max_batch:
                servers[max_batch] = start_server(args.export, max_batch, args, logs / f"server-{max_batch}.log")
        for size in args.size:
            for _, url in servers.values():
                warm(url, size, args)
            rss = {key: rss_mib(proc and proc.pid) for key, (proc, _) in servers.items()}
            bursts: dict[Any, list[dict[str, Any]]] = {key: [] for key in servers}
            per_round = max(1, args.requests // args.rounds)
            for r in range(args.rounds):  # the compared servers take turns, so load changes hit all alike
                for key, (_, url) in servers.items():
                    bursts[key].append(burst(url, size, per_round, r * per_round, args))
            for key, (proc, _) in servers.items():
                runs.append({"max_batch": key, "size": size, "batch_wait_ms": args.batch_wait_ms,
                             **summary(bursts[key]),
                             "server_rss_mib": {"before": rss[key], "after": rss_mib(proc and proc.pid)}})
                print(json.dumps(runs[-1]), flush=True)
    finally:
        codes = {key: stop_server(proc) for key, (proc, _) in servers.items() if proc is not None}
    for run in runs:
        run["server_exit_code"] = codes.get(run["max_batch"])
    record = {"study": "serve_load", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command_line(),
              "machine": machine(), "serve_packages": package_versions(), "export": args.export,
              "settings": {k: getattr(args, k) for k in ("clients", "requests", "rounds", "warmup", "size", "steps",
                                                         "scheduler", "batch_wait_ms", "threads")},
              "runs": runs}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")
    for run in runs:
        print(f"{run['size']} px, max_batch {run['max_batch']}: {run['throughput_rps']} req/s, p50 {run['latency_s']['p50']} s, "
              f"p95 {run['latency_s']['p95']} s, p99 {run['latency_s']['p99']} s, mean batch {run['mean_batch']}, "
              f"errors {run['errors'] or 0}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
