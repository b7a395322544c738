"""Study 1: time per UNet step against resolution, linear attention against softmax.

    python benchmarks/scaling.py --quick            # sd15-small, 256-1536 px, ~3 min on 2 cores
    python benchmarks/scaling.py                    # sd15-small, 256-2048 px
    python benchmarks/scaling.py --variant sd15 --sizes 256,512,768,1024
    python benchmarks/scaling.py --device cuda --dtype fp16 --engines eager,sdpa --variant sd15 \
        --sizes 1024,1536,2048,3072,4096           # GPU (see gpu_unet.py)

Engines, all on the same weights: ``ort`` the exported LinFusion UNet through the runtime's ONNX
Runtime backend, ``eager`` LinFusion in PyTorch, ``sdpa`` the original UNet (softmax
self-attention through diffusers' SDPA processor). Batch 1, fp32, one process, ORT intra-op
threads = torch threads; each round runs every engine once at a size (interleaved), medians
reported. The exponent is the log-log least-squares slope over the top 4x of the pixel range.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import models

ENGINES = ("ort", "eager", "sdpa")
LABELS = {"ort": "LinFusion, ONNX Runtime", "eager": "LinFusion, PyTorch eager", "sdpa": "softmax SDPA, PyTorch"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="sd15-small", choices=models.VARIANTS)
    p.add_argument("--sizes", help="comma-separated image sides in px")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"))
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a few minutes)")
    p.add_argument("--tiny", action="store_true", help="smoke run on the tiny preset (seconds)")
    p.add_argument("--results", type=Path, default=harness.RESULTS)
    p.add_argument("--workdir", type=Path, help="reuse the export built here (models.assets)")
    p.add_argument("--name", default="scaling")
    args = p.parse_args(argv)
    if args.tiny:
        args.variant, args.sizes, args.repeats, args.warmup, args.threads = "tiny", args.sizes or "64,128", 1, 0, 1
    elif args.quick:
        args.sizes, args.repeats = args.sizes or "256,384,512,768,1024,1536", min(args.repeats, 3)
    args.sizes = [int(s) for s in (args.sizes or "256,384,512,768,1024,1536,2048").split(",")]
    args.engines = [e for e in args.engines.split(",") if e]
    bad = [s for s in args.sizes if s % models.pixel_multiple(args.variant)]
    if bad or set(args.engines) - set(ENGINES):
        p.error(f"sizes must be multiples of {models.pixel_multiple(args.variant)} and engines among "
                f"{', '.join(ENGINES)}")
    return args


def engine_calls(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Callable[[int], Callable[[], Any]]],
                                                                   dict[str, Any]]:
    """For each engine, side -> a zero-argument call that runs one UNet step at that size."""
    import numpy as np
    import torch

    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    torch.set_num_threads(args.threads)
    loaded, softmax = models.build(args.variant, keep_softmax="sdpa" in args.engines)
    unet = loaded.pipeline.unet
    info: dict[str, Any] = {"parameters_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
                            "linfusion_layers": len(loaded.linfusion.modules_list)}
    context, channels = unet.config.cross_attention_dim, unet.config.in_channels
    if softmax is not None:
        info["softmax_processor"] = type(next(m for n, m in softmax.named_modules()
                                              if n.endswith("attn1")).processor).__name__
    calls: dict[str, Callable[[int], Callable[[], Any]]] = {}

    if "ort" in args.engines:
        from linfusion.runtime.backends.onnxruntime import OnnxRuntimeBackend
        from linfusion.runtime.contract import UNET, UNetIO
        from linfusion.runtime.manifest import load_manifest

        folder = (models.assets(args.variant, args.workdir) / "export" if args.workdir
                  else models.export(loaded, workdir / "export", components=["unet"]))
        runner = OnnxRuntimeBackend(["CPUExecutionProvider"], args.threads).load(
            folder, UNET.name, load_manifest(folder).components[UNET.name])

        def ort_call(side: int) -> Callable[[], Any]:
            rng = np.random.default_rng(0)
            feed = {UNetIO.sample: rng.standard_normal((1, channels, side // 8, side // 8), dtype=np.float32),
                    UNetIO.timestep: np.array([500.0], dtype=np.float32),
                    UNetIO.encoder_hidden_states: rng.standard_normal((1, 77, context), dtype=np.float32)}
            return lambda: runner.run(feed)

        calls["ort"] = ort_call

    def torch_call(module: Any) -> Callable[[int], Callable[[], Any]]:
        module.to(args.device, dtype)

        def make(side: int) -> Callable[[], Any]:
            g = torch.Generator().manual_seed(0)
            sample = torch.randn(1, channels, side // 8, side // 8, generator=g).to(args.device, dtype)
            text = torch.randn(1, 77, context, generator=g).to(args.device, dtype)

            def run() -> Any:
                with torch.inference_mode():
                    out = module(sample, 500, text, return_dict=False)[0]
                if args.device != "cpu":
                    torch.cuda.synchronize()
                return out
            return run
        return make

    if "eager" in args.engines:
        calls["eager"] = torch_call(unet)
    if "sdpa" in args.engines:
        calls["sdpa"] = torch_call(softmax)
    return {e: calls[e] for e in args.engines}, info


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            print(f"scaling: --device {args.device} needs a CUDA GPU and none is visible; nothing measured.")
            return 2
        if "ort" in args.engines:
            print("scaling: the ort engine runs on the CPU only; pass --engines eager,sdpa with --device cuda")
            return 2
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        calls, info = engine_calls(args, Path(tmp))
        rows, per_engine = [], {e: [] for e in args.engines}
        for side in args.sizes:
            times = harness.interleaved({e: make(side) for e, make in calls.items()}, args.repeats, args.warmup)
            medians = {e: harness.median(t) for e, t in times.items()}
            for e in args.engines:
                per_engine[e].append(medians[e])
            rows.append({"side_px": side, "pixels": side * side, "seconds": medians, "all_seconds": times})
            print(f"{side} px: " + ", ".join(f"{e} {medians[e]:.3f} s" for e in args.engines), flush=True)

    pixels = [side * side for side in args.sizes]
    summary: dict[str, Any] = {"exponent_top_4x": {e: harness.fit_exponent(pixels, per_engine[e])
                                                   for e in args.engines}}
    for lin in ("eager", "ort"):
        if lin in per_engine and "sdpa" in per_engine:
            summary[f"crossover_{lin}_vs_sdpa"] = harness.crossover(args.sizes, per_engine[lin], per_engine["sdpa"])
    if "ort" in per_engine and "eager" in per_engine:
        summary["eager_over_ort"] = [round(e / o, 3) for e, o in zip(per_engine["eager"], per_engine["ort"])]
    headers = ["side (px)", "pixels"] + [f"{LABELS[e]} (s)" for e in args.engines]
    if "sdpa" in per_engine and "eager" in per_engine:
        headers.append("sdpa / eager")
    if "eager_over_ort" in summary:
        headers.append("eager / ort")
    table_rows = []
    for i, row in enumerate(rows):
        cells = [row["side_px"], row["pixels"]] + [row["seconds"][e] for e in args.engines]
        if "sdpa / eager" in headers:
            cells.append(round(row["seconds"]["sdpa"] / row["seconds"]["eager"], 2))
        if "eager_over_ort" in summary:
            cells.append(summary["eager_over_ort"][i])
        table_rows.append(cells)
    exp_row = ["exponent, top 4x", ""] + [summary["exponent_top_4x"][e] for e in args.engines]
    table = harness.markdown_table(headers, table_rows + [exp_row + [""] * (len(headers) - len(exp_row))])
    plot = harness.loglog_plot(args.results / f"{args.name}.png",
                               {LABELS[e]: (pixels, per_engine[e]) for e in args.engines},
                               f"UNet step, {args.variant}, batch 1, {args.dtype}, {args.device}, "
                               f"{args.threads} threads", "seconds per UNet step")
    notes = [f"Model: {args.variant} ({info['parameters_m']} M UNet parameters, {info['linfusion_layers']} "
             f"LinFusion layers), random weights, batch 1, {args.dtype}, {args.threads} threads, median of "
             f"{args.repeats} interleaved repeats after {args.warmup} warm-up. Crossovers: "
             + "; ".join(f"{k}: {v}" for k, v in summary.items() if k.startswith("crossover")),
             f"![time per step against pixels]({plot.name})"]
    harness.write_results(args.name, {"variant": args.variant, "device": args.device, "dtype": args.dtype,
                                      "threads": args.threads, "repeats": args.repeats, "model": info,
                                      "rows": rows, "summary": summary}, table, notes, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
