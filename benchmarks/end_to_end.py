"""Study 2: text to image, the torch-free runtime (ONNX Runtime) against diffusers with LinFusion.

    python benchmarks/end_to_end.py --quick     # sd15-small, 512 px, 10 steps, 3 repeats
    python benchmarks/end_to_end.py             # sd15-small, 512 and 1024 px, 20 steps, 5 repeats
    python benchmarks/end_to_end.py --variant sd15 --sizes 512 --steps 20

Same model (one random-weight build, exported and saved), same prompt, size, steps, Euler
scheduler and CFG 7.5 (batched, UNet batch 2) on both sides, in one process with ORT intra-op
threads = torch threads, runs alternating. diffusers' split is measured by timing its
``encode_prompt``, ``vae.decode`` and UNet calls; its "denoise" is the rest of the call.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import models

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
PARTS = ("total", "encode", "denoise", "decode", "unet_per_step")


def timed(fn: Callable[..., Any], sink: dict[str, float], key: str) -> Callable[..., Any]:
    """``fn`` that adds its wall time to ``sink[key]``."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink[key] = sink.get(key, 0.0) + time.perf_counter() - start
    return wrapper


def diffusers_case(folder: Path, threads: int) -> Callable[[int, int], dict[str, float]]:
    import torch
    from diffusers import EulerDiscreteScheduler

    from linfusion import load_pipeline

    torch.set_num_threads(threads)
    pipe = load_pipeline(str(folder / "diffusers"), linfusion=str(folder / "linfusion"),
                         local_files_only=True).pipeline
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.disable_tiling()
    sink: dict[str, float] = {}
    pipe.encode_prompt = timed(pipe.encode_prompt, sink, "encode")
    pipe.vae.decode = timed(pipe.vae.decode, sink, "decode")
    pipe.unet.forward = timed(pipe.unet.forward, sink, "unet")

    def run(size: int, steps: int) -> dict[str, float]:
        sink.clear()
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(0))
        total = time.perf_counter() - start
        return {"total": total, "encode": sink["encode"], "decode": sink["decode"],
                "denoise": total - sink["encode"] - sink["decode"], "unet_per_step": sink["unet"] / steps}
    return run


def runtime_case(folder: Path, threads: int) -> Callable[[int, int], dict[str, float]]:
    from linfusion.runtime import Pipeline

    pipe = Pipeline.from_export(folder / "export", backend="onnxruntime", intra_op_threads=threads)

    def run(size: int, steps: int) -> dict[str, float]:
        out = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5, seed=0,
                   scheduler="euler", tile_vae=False)
        return {k: out.timings[k] for k in PARTS}
    return run


def main(argv: list[str] | None = None) -> int:
    p = models.study_parser(__doc__, harness.RESULTS, steps=20)
    p.add_argument("--sizes", default="512,1024")
    args = p.parse_args(argv)
    if args.tiny:
        args.variant, args.sizes, args.steps, args.repeats, args.threads = "tiny", "64", 2, 1, 1
    elif args.quick:
        args.sizes, args.steps, args.repeats = "512", 10, 3
    sizes = [int(s) for s in args.sizes.split(",")]

    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        folder = models.assets(args.variant, args.workdir or Path(tmp))
        cases = {"runtime": runtime_case(folder, args.threads), "diffusers": diffusers_case(folder, args.threads)}
        rows = []
        for size in sizes:
            splits: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
            calls = {name: (lambda n=name, s=size, out=splits: out[n].append(cases[n](s, args.steps))) for name in cases}
            harness.interleaved(calls, args.repeats, warmup=1)
            for name in cases:
                runs = splits[name][1:]  # the first entry is the warm-up
                rows.append({"engine": name, "side_px": size,
                             **{k: harness.median([r[k] for r in runs]) for k in PARTS}, "runs": runs})

    table_rows = []
    for size in sizes:
        rt, df = (next(r for r in rows if r["engine"] == e and r["side_px"] == size) for e in ("runtime", "diffusers"))
        for r in (rt, df):
            table_rows.append([r["engine"], size] + [r[k] for k in PARTS])
        table_rows.append(["diffusers / runtime", size] + [round(df[k] / rt[k], 2) for k in PARTS])
    table = harness.markdown_table(["engine", "side (px)", "total (s)", "encode (s)", "denoise (s)",
                                    "decode (s)", "UNet per step (s)"], table_rows)
    notes = [(f"Model: {args.variant}, random weights; {args.steps} Euler steps, CFG 7.5 (UNet batch 2), fp32, "
             f"{args.threads} threads on both sides, no VAE tiling; median of {args.repeats} alternating runs "
             f"after one warm-up each. The runtime's encode includes the initial noise; diffusers' denoise "
             f"is its total minus encode and decode (latent preparation and post-processing included).")]
    harness.write_results("end_to_end", {"variant": args.variant, "steps": args.steps, "threads": args.threads,
                                         "repeats": args.repeats, "rows": rows}, table, notes, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
