"""One image in a fresh process, by the runtime or by diffusers: the unit of the cold-start and memory studies.

    python benchmarks/child.py runtime|runtime-before|diffusers ASSETS --size 512 --steps 4 --threads 2 --tile auto|on|off

``runtime-before`` is the runtime as it was before issue 12 (no ORT model cache, ORT's default
memory pattern and arena), for before/after tables from one run.

ASSETS holds ``export/`` (for the runtime) and ``diffusers/`` + ``linfusion/`` (for PyTorch), the
same model (see models.assets). Prints one JSON line: wall-clock stamps (time.time(), so the
parent can add the interpreter's start-up), resident memory after loading and at the peak, and
whether torch was imported.
"""

from __future__ import annotations

import time

STARTED = time.time()

import argparse
import json
import sys
from pathlib import Path

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
# ONNX Runtime's session settings before issue 12 (engine "runtime-before").
BEFORE = {"enable_mem_pattern": True, "enable_cpu_mem_arena": True, "shared_arena": False, "config": {}}


def rss_mib(field: str = "VmRSS") -> float:
    """Resident set size now (VmRSS) or at its peak (VmHWM), MiB. The peak is this process's own:
    ru_maxrss would carry over the peak of the process that forked it (Linux keeps it across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_runtime(args: argparse.Namespace) -> dict[str, float]:
    from linfusion.runtime import Pipeline
    from linfusion.runtime.backends import onnxruntime as ort_backend

    imported = time.time()
    cache = {"off": False, "default": None}.get(args.cache, args.cache)
    if args.engine == "runtime-before":  # as before issue 12: no cache, ORT's own memory settings
        cache = False
        ort_backend.SESSION_DEFAULTS = {**ort_backend.SESSION_DEFAULTS, **BEFORE}
        ort_backend.COMPONENT_SETTINGS = {}
    pipe = Pipeline.from_export(args.assets / "export", backend="onnxruntime", intra_op_threads=args.threads,
                                cache_dir=cache)
    loaded, loaded_rss = time.time(), rss_mib()
    tile = {"on": True, "off": False, "auto": None}[args.tile]
    out = pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps, seed=0,
               scheduler="euler", tile_vae=tile)
    out.images[0].save(args.assets / f"runtime-{args.size}.png")
    return {"imported": imported, "loaded": loaded, "loaded_rss_mib": loaded_rss, "image": time.time()}


def run_diffusers(args: argparse.Namespace) -> dict[str, float]:
    import torch
    from diffusers import EulerDiscreteScheduler

    from linfusion import load_pipeline

    torch.set_num_threads(args.threads)
    imported = time.time()
    pipe = load_pipeline(str(args.assets / "diffusers"), linfusion=str(args.assets / "linfusion"),
                         local_files_only=True).pipeline
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if args.tile == "on":
        pipe.vae.enable_tiling()
    else:  # diffusers never tiles on its own; "auto" means its default
        pipe.vae.disable_tiling()
    loaded, loaded_rss = time.time(), rss_mib()
    with torch.inference_mode():
        image = pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps,
                     generator=torch.Generator().manual_seed(0)).images[0]
    image.save(args.assets / f"diffusers-{args.size}.png")
    return {"imported": imported, "loaded": loaded, "loaded_rss_mib": loaded_rss, "image": time.time()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("engine", choices=("runtime", "runtime-before", "diffusers"))
    p.add_argument("assets", type=Path)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tile", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--cache", default="default", help="runtime: ORT model cache directory, 'default' or 'off'")
    args = p.parse_args()
    stamps = run_diffusers(args) if args.engine == "diffusers" else run_runtime(args)
    stamps.update(started=STARTED, peak_rss_mib=rss_mib("VmHWM"),
                  torch_imported="torch" in sys.modules)
    print(json.dumps(stamps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
