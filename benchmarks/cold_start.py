"""Study 4: process start to first image, the torch-free runtime against diffusers.

    python benchmarks/cold_start.py --quick     # sd15-small, 512 px, 4 steps, 3 alternating pairs
    python benchmarks/cold_start.py             # sd15-small, 512 px, 20 steps, 5 pairs
    python benchmarks/cold_start.py --quick --serve   # linfusion-serve: spawn to /readyz to first image

Each run is a fresh ``python benchmarks/child.py`` process on the same model (export for the
runtime, diffusers folder + LinFusion checkpoint for PyTorch). Times are from just before the
process is spawned to the first image saved, split into interpreter start, imports, loading
and generation. One discarded warm-up pair first: the page cache is warm, the processes are cold.

``--serve`` times ``linfusion-serve`` instead (before: no model cache and ORT's old memory
settings; after: today's defaults): from spawn to the first 200 of ``/readyz`` (polled every
20 ms) and to the first image of one OpenAI request; diffusers has no server to compare.
Writes ``results/cold_start.json`` (``cold_start_serve.json`` with ``--serve``).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import models

CHILD = Path(__file__).resolve().parent / "child.py"
PHASES = ("start", "imports", "load", "generate", "to_ready", "to_first_image")
ENGINES = ("runtime-before", "runtime", "diffusers")


def spawn(engine: str, folder: Path, size: int, steps: int, threads: int, tile: str = "auto",
          cache: str = "default") -> dict[str, Any]:
    """Run one child; returns its JSON result with the spawn time and the process's wall time."""
    spawned = time.time()
    done = subprocess.run([sys.executable, str(CHILD), engine, str(folder), "--size", str(size), "--steps",
                           str(steps), "--threads", str(threads), "--tile", tile, "--cache", cache],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{engine} child failed:\n{done.stderr[-3000:]}")
    result = harness.child_json(done.stdout)
    result.update(spawned=spawned, exited=time.time())
    return result


def phases(r: dict[str, Any]) -> dict[str, float]:
    return {"start": r["started"] - r["spawned"], "imports": r["imported"] - r["started"],
            "load": r["loaded"] - r["imported"], "generate": r["image"] - r["loaded"],
            "to_ready": r["loaded"] - r["spawned"],
            "to_first_image": r["image"] - r["spawned"]}


# The server as before issue 12: ORT's default memory pattern and arena (with --cache-dir off).
BEFORE_SERVER = ("from linfusion.runtime.backends import onnxruntime as o; import runpy, sys; "
                 "o.SESSION_DEFAULTS = {**o.SESSION_DEFAULTS, 'enable_mem_pattern': True, "
                 "'enable_cpu_mem_arena': True, 'shared_arena': False, 'config': {}}; o.COMPONENT_SETTINGS = {}; "
                 "sys.argv[0] = 'linfusion-serve'; "
                 "runpy.run_module('linfusion.serve.cli', run_name='__main__')")


def serve_once(side: str, folder: Path, size: int, steps: int, threads: int, cache: str) -> dict[str, float]:
    """Spawn linfusion-serve, poll /readyz, send one request, stop it: seconds from the spawn."""
    import signal
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = [str(folder / "export"), "--port", str(port), "--threads", str(threads), "--log-level", "warning",
               "--cache-dir", "off" if side == "before" else cache]
    head = ["-c", BEFORE_SERVER] if side == "before" else ["-m", "linfusion.serve.cli"]
    url = f"http://127.0.0.1:{port}"
    spawned = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *head, *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited {proc.returncode}: {proc.stderr.read()[-2000:]!r}")
                try:
                    if client.get("/readyz", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
            ready = time.perf_counter() - spawned
            body = {"prompt": child_prompt(), "size": f"{size}x{size}", "num_inference_steps": steps, "seed": 0,
                    "scheduler": "euler"}
            client.post("/v1/images/generations", json=body).raise_for_status()
            image = time.perf_counter() - spawned
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    return {"to_ready": ready, "to_first_image": image}


def child_prompt() -> str:
    import child

    return child.PROMPT


def serve_study(args, folder: Path, cache: str) -> None:
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for index in range(args.repeats + 1):
        for side, kept in runs.items():
            result = serve_once(side, folder, args.size, args.steps, args.threads, cache)
            if index:
                kept.append(result)
            elif side == "after":
                building = result
    medians = {side: {k: harness.median([r[k] for r in runs[side]]) for k in ("to_ready", "to_first_image")}
               for side in runs}
    rows = [[side, medians[side]["to_ready"], medians[side]["to_first_image"]] for side in runs]
    rows.append(["before / after", round(medians["before"]["to_ready"] / medians["after"]["to_ready"], 2),
                 round(medians["before"]["to_first_image"] / medians["after"]["to_first_image"], 2)])
    table = harness.markdown_table(["linfusion-serve", "spawn to /readyz (s)", "spawn to first image (s)"], rows)
    notes = [(f"Model: {args.variant}; one OpenAI request, {args.size} px, {args.steps} Euler steps, CFG, "
              f"{args.threads} threads; medians of {args.repeats} rounds after a discarded one (whose 'after' "
              f"server built the model cache: {building['to_ready']:.2f} s to /readyz).")]
    harness.write_results("cold_start_serve", {"variant": args.variant, "size": args.size, "steps": args.steps,
                                               "medians": medians, "building_start": building, "runs": runs},
                          table, notes, args.results)


def main(argv: list[str] | None = None) -> int:
    p = models.study_parser(__doc__, harness.RESULTS, steps=20)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--serve", action="store_true", help="time linfusion-serve to /readyz and a first image")
    args = p.parse_args(argv)
    if args.tiny:
        args.variant, args.size, args.steps, args.repeats, args.threads = "tiny", 64, 2, 1, 1
    elif args.quick:
        args.steps, args.repeats = 4, 3
    if args.serve:
        with tempfile.TemporaryDirectory(prefix="cold-") as tmp:
            serve_study(args, models.assets(args.variant, args.workdir or Path(tmp)), str(Path(tmp) / "ort-cache"))
        return 0

    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in ENGINES}
    with tempfile.TemporaryDirectory(prefix="cold-") as tmp:
        folder = models.assets(args.variant, args.workdir or Path(tmp))
        cache = str(Path(tmp) / "ort-cache")  # empty: the discarded first round builds it
        for index in range(args.repeats + 1):
            for engine in ENGINES:
                result = spawn(engine, folder, args.size, args.steps, args.threads, cache=cache)
                if index:  # the first round warms the page cache (and fills the model cache)
                    runs[engine].append(result)
                elif engine == "runtime":
                    building = phases(result)

    medians = {e: {k: harness.median([phases(r)[k] for r in runs[e]]) for k in PHASES} for e in ENGINES}
    rows = [[e] + [medians[e][k] for k in PHASES] + [runs[e][0]["torch_imported"]] for e in ENGINES]
    for side in ("runtime-before", "runtime"):
        rows.append([f"diffusers / {side}"] + [round(medians["diffusers"][k] / max(medians[side][k], 1e-9), 2)
                                               for k in PHASES] + [""])
    table = harness.markdown_table(["engine", "interpreter start (s)", "imports (s)", "load (s)", "generate (s)",
                                    "spawn to ready (s)", "spawn to first image (s)", "torch imported"], rows)
    notes = [(f"Model: {args.variant}, random weights; {args.size} px, {args.steps} Euler steps, CFG 7.5, "
              f"{args.threads} threads; medians of {args.repeats} rounds of fresh processes (runtime-before, "
              f"runtime, diffusers in turn) after one discarded round (warm page cache). runtime-before: no "
              f"ORT model cache, ORT's default memory pattern and arena; runtime: today's defaults, model cache "
              f"filled by the discarded round (whose runtime start, building it, took "
              f"{building['to_ready']:.2f} s to ready). Target: runtime >= 3x faster to the first image.")]
    harness.write_results("cold_start", {"variant": args.variant, "size": args.size, "steps": args.steps,
                                         "threads": args.threads, "repeats": args.repeats, "medians": medians,
                                         "building_start": building, "runs": runs}, table, notes, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
