"""Soak: does one long-lived ``Pipeline`` keep its memory? Many generations from several threads.

    python benchmarks/soak.py                       # 200 generations, 4 threads, tiny-sd
    python benchmarks/soak.py --export DIR          # reuse a tiny-sd export (else one is made)

One ``Pipeline`` (ONNX Runtime, CPU, 1 intra-op thread per call) serves every generation;
requests mix sizes (64x64, 96x64, 64x128), schedulers (euler, euler_a, ddim, dpmpp_2m, lcm),
1-3 steps, with and without classifier-free guidance, PIL and numpy outputs. Generations run in
rounds of ``--warmup`` (20) from ``--threads`` threads; after each round, with no request in
flight, the resident set (VmRSS in /proc/self/status) is read. Growth is measured from the end
of the first round to the end.

The first round is the warm-up: every size and scheduler, and twice ``--threads`` of the largest
requests run in lockstep, so that the peak the threads can reach together is reserved by then.
Without that (``--random-warmup``) the growth also counts the rare moments when requests
overlap more than ever before: ONNX Runtime's arenas and malloc keep what a peak took, so RSS
climbs in steps to a plateau (9-10 % on 2 cores) although nothing leaks. The export is made in a
separate process, so that this one never imports torch.

``--server``: the same plan as HTTP requests to one running ``linfusion-serve`` (started here on
127.0.0.1, ``--max-batch 4``), alternating the OpenAI and the AUTOMATIC1111 endpoints, from
``--threads`` clients; the server's RSS is read from /proc/PID/status after each round. Its
warm-up sends the largest request as full batches (``--threads`` at once, same settings, so the
batcher coalesces them) twice, then every size with every scheduler.

Writes ``results/soak.json`` (``soak_server.json`` with ``--server``), prints one line, and exits 1
when growth reaches ``--max-growth``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import harness

SIZES = ((64, 64), (96, 64), (64, 128))  # width x height; tiny-sd needs multiples of 32
SCHEDULERS = ("euler", "euler_a", "ddim", "dpmpp_2m", "lcm")
PROMPTS = ("a lighthouse at dusk", "a bowl of cherries, oil painting", "", "two cats on a sofa, photo")


def status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def requests(count: int, threads: int, seed: int = 0, peak_first: bool = True) -> list[dict]:
    """The generation plan. With ``peak_first`` it opens with two groups of ``threads`` requests
    of the largest kind (64x128 with CFG, 3 steps; ``soak`` runs each group in lockstep, so the
    memory they need together, with ONNX Runtime's memory patterns cached by the first group, is
    reserved inside the warm-up), then the other sizes with every scheduler; the rest is random.
    Without it the whole plan is random."""
    rng = random.Random(seed)
    opening = []
    if peak_first:
        opening = [{"width": 64, "height": 128, "num_inference_steps": 3, "guidance_scale": 7.5,
                    "scheduler": SCHEDULERS[i % len(SCHEDULERS)]} for i in range(2 * threads)]
        opening += [{"width": w, "height": h, "scheduler": sched} for w, h in SIZES if (w, h) != (64, 128)
                     for sched in SCHEDULERS]
    out = []
    for index in range(count):
        request = {"scheduler": rng.choice(SCHEDULERS), "num_inference_steps": rng.randint(1, 3),
                   "guidance_scale": rng.choice((1.0, 7.5)), **dict(zip(("width", "height"), rng.choice(SIZES)))}
        if index < len(opening):
            request.update(opening[index])
        out.append({**request, "prompt": PROMPTS[index % len(PROMPTS)], "seed": index,
                    "output_type": rng.choice(("pil", "np"))})
    return out


def make_export(folder: Path) -> Path:
    """A tiny-sd export, made by ``linfusion-export`` in a child process (torch stays out of here)."""
    out = folder / "export"
    if not (out / "linfusion.json").exists():
        subprocess.run([sys.executable, "-W", "ignore", "-m", "linfusion.export.cli", "--model", "tiny-sd",
                        "--skip-parity", "--force", "--output", str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


def soak(export: Path, generations: int, threads: int, warmup: int, intra_op_threads: int,
         peak_first: bool = True) -> dict:
    from linfusion.runtime import Pipeline

    pipe = Pipeline.from_export(export, backend="onnxruntime", intra_op_threads=intra_op_threads)
    plan = requests(generations, threads, peak_first=peak_first)
    lockstep = threading.Barrier(threads)

    def generate(index: int):
        kwargs = plan[index]
        if peak_first and index < 2 * threads:  # the largest requests step and decode together
            kwargs = {**kwargs, "callback": lambda step, total: lockstep.wait(timeout=300)}
        return pipe(**kwargs)

    samples = [{"generations": 0, "rss_mib": status_kib("VmRSS") / 1024}]
    seconds = []
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for first in range(0, generations, warmup):
            batch = range(first, min(first + warmup, generations))
            for result in pool.map(generate, batch):
                seconds.append(result.timings["total"])
                del result
            gc.collect()
            samples.append({"generations": batch.stop, "rss_mib": status_kib("VmRSS") / 1024})
    wall = time.perf_counter() - start
    base = next(s for s in samples if s["generations"] >= min(warmup, generations))
    end = samples[-1]
    return {"generations": generations, "threads": threads, "intra_op_threads": intra_op_threads,
            "peak_first": peak_first,
            "warmup": base["generations"], "rss_after_warmup_mib": round(base["rss_mib"], 1),
            "rss_end_mib": round(end["rss_mib"], 1), "peak_rss_mib": round(status_kib("VmHWM") / 1024, 1),
            "growth_percent": round(100 * (end["rss_mib"] - base["rss_mib"]) / base["rss_mib"], 2),
            "samples": [{**s, "rss_mib": round(s["rss_mib"], 1)} for s in samples],
            "wall_seconds": round(wall, 1), "median_generation_seconds": round(harness.median(seconds), 3),
            "torch_imported": "torch" in sys.modules}


A1111_SAMPLERS = {"euler": "Euler", "euler_a": "Euler a", "ddim": "DDIM", "dpmpp_2m": "DPM++ 2M", "lcm": "LCM"}


def http_body(index: int, request: dict) -> tuple[str, dict]:
    """One planned generation as an OpenAI (even index) or AUTOMATIC1111 (odd) request."""
    if index % 2:
        return "/sdapi/v1/txt2img", {
            "prompt": request["prompt"], "seed": request["seed"], "steps": request.get("num_inference_steps", 2),
            "cfg_scale": request.get("guidance_scale", 7.5), "width": request["width"],
            "height": request["height"], "sampler_name": A1111_SAMPLERS[request["scheduler"]]}
    return "/v1/images/generations", {
        "prompt": request["prompt"], "seed": request["seed"], "size": f"{request['width']}x{request['height']}",
        "num_inference_steps": request.get("num_inference_steps", 2),
        "guidance_scale": request.get("guidance_scale", 7.5), "scheduler": request["scheduler"]}


def soak_server(export: Path, generations: int, threads: int, warmup: int, intra_op_threads: int,
                log: Path, peak_first: bool = True) -> dict:
    import httpx
    from serve_load import rss_mib, start_server, stop_server

    plan = requests(generations, threads, peak_first=peak_first)
    for request in plan[:2 * threads] if peak_first else []:
        request["scheduler"] = "euler"  # one batch key, so that each group runs as one full batch
    settings = argparse.Namespace(batch_wait_ms=200.0, clients=threads, request_timeout=300.0,
                                  threads=intra_op_threads)
    proc, url = start_server(str(export), threads, settings, log)
    errors: list[str] = []
    try:
        def generate(index: int) -> float:
            start = time.perf_counter()
            path, body = http_body(index, plan[index])
            with httpx.Client(base_url=url, timeout=300) as client:
                response = client.post(path, json=body)
            if response.status_code != 200:
                errors.append(f"{path}: {response.status_code} {response.text[:200]}")
            return time.perf_counter() - start

        samples = [{"generations": 0, "rss_mib": rss_mib(proc.pid)}]
        seconds: list[float] = []
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for first in range(0, generations, warmup):
                stop = min(first + warmup, generations)
                groups = [range(first, stop)]
                if peak_first and first == 0:  # the full batches first, each group on its own
                    groups = [range(g, min(g + threads, stop)) for g in range(0, 2 * threads, threads)]
                    groups.append(range(2 * threads, stop))
                for group in groups:
                    seconds += list(pool.map(generate, group))
                samples.append({"generations": stop, "rss_mib": rss_mib(proc.pid)})
        wall = time.perf_counter() - start
        peak = int(Path(f"/proc/{proc.pid}/status").read_text().split("VmHWM:")[1].split()[0]) / 1024
    finally:
        exit_code = stop_server(proc)
    base = next(s for s in samples if s["generations"] >= min(warmup, generations))
    end = samples[-1]
    return {"generations": generations, "threads": threads, "intra_op_threads": intra_op_threads,
            "peak_first": peak_first, "server": True, "max_batch": threads, "errors": errors[:5],
            "error_count": len(errors), "server_exit_code": exit_code,
            "warmup": base["generations"], "rss_after_warmup_mib": base["rss_mib"], "rss_end_mib": end["rss_mib"],
            "peak_rss_mib": round(peak, 1),
            "growth_percent": round(100 * (end["rss_mib"] - base["rss_mib"]) / base["rss_mib"], 2),
            "samples": samples, "wall_seconds": round(wall, 1),
            "median_generation_seconds": round(harness.median(seconds), 3), "torch_imported": False}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, help="a tiny-sd export directory (default: make one)")
    p.add_argument("--generations", type=int, default=200)
    p.add_argument("--threads", type=int, default=4, help="threads calling the one Pipeline (default 4)")
    p.add_argument("--warmup", type=int, default=20, help="generations before the baseline (default 20)")
    p.add_argument("--intra-op-threads", type=int, default=1,
                   help="ONNX Runtime threads per call (default 1: the caller threads share the cores)")
    p.add_argument("--random-warmup", action="store_true",
                   help="no largest-requests-first warm-up: growth then includes reaching the peak")
    p.add_argument("--max-growth", type=float, default=5.0, help="exit 1 at this growth in percent (default 5)")
    p.add_argument("--server", action="store_true", help="soak one linfusion-serve over HTTP instead")
    p.add_argument("--results", type=Path, default=harness.RESULTS)
    args = p.parse_args(argv)
    if args.generations <= args.warmup:
        p.error("--generations must exceed --warmup")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        export = args.export or make_export(Path(tmp))
        if args.server:
            record = soak_server(export, args.generations, args.threads, args.warmup, args.intra_op_threads,
                                 Path(tmp) / "server.log", not args.random_warmup)
        else:
            record = soak(export, args.generations, args.threads, args.warmup, args.intra_op_threads,
                          not args.random_warmup)
    record = {"study": "soak", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": harness.command_line(), "machine": harness.machine(), "model": "tiny-sd",
              "sizes": [f"{w}x{h}" for w, h in SIZES], "schedulers": list(SCHEDULERS),
              "max_growth_percent": args.max_growth, **record}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / ("soak_server.json" if args.server else "soak.json")).write_text(json.dumps(record, indent=2) + "\n")
    ok = record["growth_percent"] < args.max_growth and not record.get("error_count")
    print(f"soak{' (server)' if args.server else ''}: {record['generations']} generations, {record['threads']} threads: RSS "
          f"{record['rss_after_warmup_mib']:.1f} MiB after {record['warmup']} -> {record['rss_end_mib']:.1f} MiB "
          f"at the end ({record['growth_percent']:+.2f}%, limit {args.max_growth:g}%) in {record['wall_seconds']:.0f}s: "
          f"{'ok' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
