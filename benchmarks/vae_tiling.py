"""Study: the tiled VAE at scale (runtime/vae.py) - time per megapixel, peak memory, tiled vs full PSNR.

    python benchmarks/vae_tiling.py --export DIR        # DIR: the real-size SD-1.5 VAE, e.g. from
        linfusion-export --model sd15 --random-weights --skip-parity --components vae_decoder,vae_encoder
    python benchmarks/vae_tiling.py --tiny              # smoke run on the tiny preset (seconds)

Targets (issue 11): tiled decode time per megapixel at --large (2048 px) at most 1.5x the untiled
decode time per megapixel at the model's native size, and tiled vs untiled decode PSNR >= 40 dB at
a size where both fit (--psnr-size). The tiling is the one the pipeline picks for ``tile_vae=True``
(``vae.choose_tiling``: tile from --budget-gib, fixed overlap, batched tiles).

Every measurement runs in a fresh child process (ONNX Runtime CPU, fp32) so that its peak
resident memory (ru_maxrss) is its own; native and tiled children alternate. Wall-clock and
process CPU time are both recorded: on a shared machine a short native decode can catch a quiet
moment that a ten-minute tiled decode cannot, so the CPU-time ratio is the steadier one. PSNR is measured on
two kinds of latents, since these random-weight models have no natural images: ``generated``,
the runtime's own denoising output (the tiny-sd pipeline at the same latent size) and
``image-like``, the VAE encoder's mean of a smooth synthetic picture rescaled to the standard
deviation of generated latents (1 / scaling factor).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import models
import numpy as np

GIB = 2**30


def load(export: Path, component: str, threads: int):
    from linfusion.runtime.backends.select import load_backend
    from linfusion.runtime.manifest import load_manifest

    manifest = load_manifest(export, verify=False)
    backend = load_backend("onnxruntime", export, intra_op_threads=threads)
    return manifest, backend.load(export, component, manifest.components[component])


def tiling_for(manifest, runner, latent_side: int, budget: float, tiled: bool):
    from linfusion.runtime import vae

    facts = manifest.pipeline
    channels = (facts.vae_block_channels or (128,))[0]
    itemsize = runner.input_dtype(runner.input_names[0]).itemsize
    return vae.choose_tiling(latent_side, latent_side, tiled, facts.native_latent_side, facts.vae_scale_factor,
                             channels, itemsize, int(budget * GIB)) if tiled else None


def child(args: argparse.Namespace) -> dict:
    """One case in this process: decode (timed, repeated), encode or generate latents."""
    from linfusion.runtime import vae

    if args.child == "generate":
        from linfusion.runtime import Pipeline

        pipe = Pipeline.from_export(args.export, backend="onnxruntime", intra_op_threads=args.threads)
        grabbed = {}
        original = vae.decode

        def grab(runner, latents, factor, tiling):
            grabbed["latents"] = latents
            return original(runner, latents[:, :, :8, :8], factor, None)

        vae.decode = grab
        pipe("a lighthouse on a cliff at dusk, oil painting", height=args.side, width=args.side,
             num_inference_steps=8, seed=1, scheduler="euler", tile_vae=False)
        np.save(args.out, grabbed["latents"])
        return {"std": float(grabbed["latents"].std())}
    manifest, runner = load(args.export, "vae_encoder" if args.child == "encode" else "vae_decoder", args.threads)
    factor = manifest.pipeline.vae_scale_factor
    if args.child == "encode":
        y, x = np.mgrid[0:args.side, 0:args.side] / np.float32(args.side)
        picture = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), np.sin(9 * x * y)])[None]
        mean = np.split(vae.encode(runner, picture.astype(np.float32), factor, None), 2, axis=1)[0]
        mean = (mean - mean.mean(axis=(2, 3), keepdims=True)) / mean.std() / manifest.pipeline.vae_scaling_factor
        np.save(args.out, mean.astype(np.float32))
        return {"std": float(mean.std())}
    side = args.side // factor
    latents = (np.load(args.latents) if args.latents else
               np.random.default_rng(0).standard_normal((1, 4, side, side)).astype(np.float32)
               / np.float32(manifest.pipeline.vae_scaling_factor))
    tiling = tiling_for(manifest, runner, side, args.budget_gib, args.tiled)
    if tiling is not None:  # warm-up on one tile (ORT's first call at a shape allocates)
        tile = tiling.spans(side)[1]
        vae.decode(runner, latents[:, :, :tile, :tile], factor, None)
    else:
        vae.decode(runner, latents, factor, None)
    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu = time.perf_counter(), time.process_time()
        images = vae.decode(runner, latents, factor, tiling)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    if args.out:
        np.save(args.out, np.clip(images / 2 + 0.5, 0, 1))
    return {"times": times, "cpu_times": cpu_times, "megapixels": args.side**2 / 1e6,
            "tiling": None if tiling is None else {"tile": tiling.tile, "overlap": tiling.overlap,
                                                   "batch": tiling.batch, "span": tiling.spans(side)},
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def spawn(args: argparse.Namespace, kind: str, side: int, tiled: bool = False, repeats: int = 1,
          latents: Path | None = None, out: Path | None = None, export: Path | None = None) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--export", str(export or args.export), "--side",
               str(side), "--threads", str(args.threads), "--budget-gib", str(args.budget_gib),
               "--repeats", str(repeats)]
    command += ["--tiled"] if tiled else []
    command += ["--latents", str(latents)] if latents else []
    command += ["--out", str(out)] if out else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{kind} child failed:\n{done.stderr[-3000:]}")
    return harness.child_json(done.stdout)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, help="export with vae_decoder and vae_encoder (real-size SD-1.5)")
    p.add_argument("--native", type=int, help="untiled reference side in px (default: the model's native)")
    p.add_argument("--large", type=int, default=2048, help="tiled side in px")
    p.add_argument("--psnr-size", type=int, default=768, help="side in px where tiled and full decodes both fit")
    p.add_argument("--repeats", type=int, default=2, help="timed decodes of the native size per child")
    p.add_argument("--rounds", type=int, default=1, help="alternating native/tiled rounds")
    p.add_argument("--budget-gib", type=float, default=4.0, help="VAE memory budget the tile comes from")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, help="keep the tiny-sd export for generated latents here")
    p.add_argument("--tiny", action="store_true", help="smoke run on the tiny preset")
    p.add_argument("--results", type=Path, default=harness.RESULTS)
    p.add_argument("--child", choices=["decode", "encode", "generate"], help=argparse.SUPPRESS)
    p.add_argument("--side", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tiled", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--latents", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="vae-tiling-") as tmp:
        tmp = Path(tmp)
        tiny = models.assets("tiny", args.workdir or tmp / "tiny") / "export"
        if args.tiny:
            args.export, args.large, args.psnr_size, args.repeats, args.threads = tiny, 512, 256, 1, 1
            args.budget_gib = 0.1  # small enough that the tiny VAE tiles at 256 px
        if args.export is None:
            p.error("--export DIR is required (or --tiny)")
        from linfusion.runtime.manifest import load_manifest

        facts = load_manifest(args.export, verify=False).pipeline
        native = args.native or facts.default_size
        rows, native_runs, tiled_runs = [], [], []
        for _ in range(args.rounds):
            native_runs.append(spawn(args, "decode", native, repeats=args.repeats))
            tiled_runs.append(spawn(args, "decode", args.large, tiled=True))
            print(f"native {min(native_runs[-1]['times']):.1f}s, tiled {args.large}: "
                  f"{min(tiled_runs[-1]['times']):.1f}s", flush=True)
        runs = {"native": native_runs, "tiled": tiled_runs}
        per_mp = {name: min(min(r["times"]) for r in rs) / rs[0]["megapixels"] for name, rs in runs.items()}
        cpu_per_mp = {name: min(min(r["cpu_times"]) for r in rs) / rs[0]["megapixels"] for name, rs in runs.items()}
        ratio, cpu_ratio = per_mp["tiled"] / per_mp["native"], cpu_per_mp["tiled"] / cpu_per_mp["native"]
        for name, label in (("native", f"{native} px untiled"), ("tiled", f"{args.large} px tiled")):
            rows.append([label, per_mp[name], cpu_per_mp[name], max(r["peak_rss_mib"] for r in runs[name]),
                         json.dumps(runs[name][0]["tiling"]) if name == "tiled" else "–"])

        side, quality = args.psnr_size, {}
        spawn(args, "generate", side, latents=None, out=tmp / "generated.npy", export=tiny)
        spawn(args, "encode", side, out=tmp / "image-like.npy")
        for kind in ("generated", "image-like"):
            full = spawn(args, "decode", side, latents=tmp / f"{kind}.npy", out=tmp / "full.npy")
            tiled = spawn(args, "decode", side, tiled=True, latents=tmp / f"{kind}.npy", out=tmp / "tiled.npy")
            quality[kind] = {"psnr_db": psnr(np.load(tmp / "full.npy"), np.load(tmp / "tiled.npy")),
                             "tiling": tiled["tiling"], "full_peak_rss_mib": full["peak_rss_mib"],
                             "tiled_peak_rss_mib": tiled["peak_rss_mib"]}
            print(f"{kind}: PSNR {quality[kind]['psnr_db']:.2f} dB", flush=True)

    record = {"export": str(args.export), "native_px": native, "large_px": args.large, "budget_gib": args.budget_gib,
              "seconds_per_megapixel": per_mp, "cpu_seconds_per_megapixel": cpu_per_mp,
              "tiled_over_native": ratio, "tiled_over_native_cpu": cpu_ratio, "target_ratio": 1.5,
              "native_runs": native_runs, "tiled_runs": tiled_runs, "psnr_size_px": side, "psnr": quality,
              "target_psnr_db": 40.0}
    headers = ["case", "s / megapixel", "CPU s / megapixel", "peak RSS MiB", "tiling"]
    table = harness.markdown_table(headers, rows)
    notes = [(f"Tiled at {args.large} px over untiled at {native} px, per megapixel: {ratio:.2f}x wall clock, "
              f"{cpu_ratio:.2f}x CPU time (target <= 1.5x; best run of each, CPU time is the process's user + "
              f"system time, less sensitive to other jobs on a shared machine)."),
             "PSNR tiled vs full at " + f"{side} px: " + ", ".join(
                 f"{k} latents {v['psnr_db']:.1f} dB" for k, v in quality.items()) + " (target >= 40 dB)."]
    harness.write_results("vae_tiling", record, table, notes, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
