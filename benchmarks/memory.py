"""Study 5: peak resident memory against resolution, runtime against PyTorch, VAE tiling on and off.

    python benchmarks/memory.py --quick     # sd15-small, 512 and 1024 px, 1 step
    python benchmarks/memory.py             # sd15-small, 512 to 2048 px, 2 steps

Each point is a fresh ``benchmarks/child.py`` process (one image, CFG 7.5, Euler) whose peak RSS
(VmHWM) is read at the end; RSS after loading is recorded too. The PyTorch side is diffusers
with LinFusion mounted, tiling through ``vae.enable_tiling()``; the runtime's through
``tile_vae``. Both tile at 64 latent pixels with a quarter overlap.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import harness
import models
from cold_start import ENGINES, spawn


def main(argv: list[str] | None = None) -> int:
    p = models.study_parser(__doc__, harness.RESULTS, steps=2, repeats=None)
    p.add_argument("--sizes", default="512,1024,1536,2048")
    args = p.parse_args(argv)
    if args.tiny:
        args.variant, args.sizes, args.steps, args.threads = "tiny", "64", 1, 1
    elif args.quick:
        args.sizes, args.steps = "512,1024", 1
    sizes = [int(s) for s in args.sizes.split(",")]

    rows = []
    with tempfile.TemporaryDirectory(prefix="memory-") as tmp:
        folder = models.assets(args.variant, args.workdir or Path(tmp))
        cache = str(Path(tmp) / "ort-cache")
        spawn("runtime", folder, 64 * (1 + (args.variant != "tiny")), 1, args.threads, "off", cache)  # fills it
        for size in sizes:
            for tile in ("off", "on"):
                for engine in ENGINES:
                    r = spawn(engine, folder, size, args.steps, args.threads, tile, cache)
                    rows.append({"side_px": size, "tile_vae": tile, "engine": engine,
                                 "peak_rss_mib": r["peak_rss_mib"], "loaded_rss_mib": r["loaded_rss_mib"]})
                    print(f"{size} px, tiling {tile}, {engine}: peak {r['peak_rss_mib']:.0f} MiB", flush=True)

    def peak(size: int, tile: str, engine: str) -> float:
        return next(r["peak_rss_mib"] for r in rows
                    if (r["side_px"], r["tile_vae"], r["engine"]) == (size, tile, engine))

    def loaded(engine: str) -> float:
        return harness.median([r["loaded_rss_mib"] for r in rows if r["engine"] == engine])

    table_rows = [[size, tile, peak(size, tile, "runtime-before"), peak(size, tile, "runtime"),
                   peak(size, tile, "diffusers"), round(peak(size, tile, "runtime-before") / peak(size, tile, "diffusers"), 2),
                   round(peak(size, tile, "runtime") / peak(size, tile, "diffusers"), 2)]
                  for size in sizes for tile in ("off", "on")]
    table = harness.markdown_table(["side (px)", "VAE tiling", "runtime before (MiB)", "runtime (MiB)",
                                    "PyTorch (MiB)", "before / PyTorch", "runtime / PyTorch"], table_rows)
    notes = [(f"Model: {args.variant}, random weights, fp32; one image, {args.steps} Euler step(s), CFG 7.5 "
             f"(UNet batch 2), {args.threads} threads, one fresh process per cell. RSS after loading "
             f"(median): runtime before {loaded('runtime-before'):.0f} MiB, runtime {loaded('runtime'):.0f} MiB, "
             f"PyTorch {loaded('diffusers'):.0f} MiB. runtime-before: no ORT model cache, ORT's default memory "
             f"pattern and arena; runtime: today's defaults, model cache filled first. "
             f"Target: runtime <= PyTorch at every size.")]
    plot = harness.loglog_plot(
        args.results / "memory.png",
        {f"{engine}, tiling {tile}": ([s * s for s in sizes], [peak(s, tile, engine) for s in sizes])
         for engine in ENGINES for tile in ("off", "on")},
        f"peak RSS, {args.variant}, one image", "peak RSS (MiB)")
    notes.append(f"![peak RSS against pixels]({plot.name})")
    harness.write_results("memory", {"variant": args.variant, "steps": args.steps, "threads": args.threads,
                                     "rows": rows}, table, notes, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
