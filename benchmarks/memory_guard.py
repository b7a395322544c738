"""Calibration of the memory guard (runtime/memory.py): measured peak RSS against the estimate.

    python benchmarks/memory_guard.py --export tiny=/tmp/tiny-sd --export sd15=/tmp/sd15 \\
        --cases tiny:256:1:batched:auto,tiny:512:1:sequential:auto,sd15:512:1:batched:auto

A case is ``NAME:SIDE:BATCH:CFG:TILE[:img2img]`` (CFG none | batched | sequential, TILE auto | on | off).
Each case is one fresh process (``--child``) that loads the export with ONNX Runtime and makes one
generation of ``--steps`` Euler steps at SIDE x SIDE; the parent reads the child's own peak RSS
from ``os.wait4`` (ru_maxrss, kernel-accounted, includes everything the process touched). The
child also records VmHWM at the end of each stage (load, text, VAE encode, UNet, VAE decode) by
wrapping the runners, which is what the per-stage constants of the estimate are fitted to.
Writes ``results/memory_guard.json`` and prints a markdown table with estimate / measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
MIB = 2**20
CONFIGS = Path(__file__).resolve().parents[1] / "linfusion" / "configs"


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def meminfo_kib(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def parse_case(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (5, 6) or (len(parts) == 6 and parts[5] != "img2img"):
        raise SystemExit(f"bad case {text!r}: NAME:SIDE:BATCH:CFG:TILE[:img2img]")
    name, side, batch, cfg, tile = parts[:5]
    if cfg not in ("none", "batched", "sequential") or tile not in ("auto", "on", "off"):
        raise SystemExit(f"bad case {text!r}: CFG none|batched|sequential, TILE auto|on|off")
    return {"model": name, "side": int(side), "batch": int(batch), "cfg": cfg, "tile": tile,
            "img2img": len(parts) == 6}


def child(args: argparse.Namespace) -> int:
    """One generation; prints a JSON line of VmHWM (MiB) at the end of each stage."""
    import numpy as np
    from linfusion.runtime import Pipeline

    marks: dict[str, float] = {"start": status_kib("VmHWM") / 1024}
    pipe = Pipeline.from_export(args.directory, backend="onnxruntime", verify=False,
                                intra_op_threads=args.threads)
    if args.img2img:
        pipe.runner("vae_encoder")
    marks["loaded"] = status_kib("VmHWM") / 1024
    marks["loaded_rss"] = status_kib("VmRSS") / 1024

    def wrap(runner, stage: str) -> None:
        original = runner.run

        def run(*a, **k):
            out = original(*a, **k)
            marks[stage] = status_kib("VmHWM") / 1024
            return out
        runner.run = run

    for name in pipe.manifest.pipeline.text_encoders:
        wrap(pipe.runners[name], "text")
    wrap(pipe.runners["unet"], "unet")
    wrap(pipe.runners["vae_decoder"], "vae_decode")
    if args.img2img:
        wrap(pipe.runners["vae_encoder"], "vae_encode")
    image = None
    if args.img2img:
        from PIL import Image

        pixels = np.random.default_rng(0).integers(0, 256, (args.side, args.side, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    tile = {"on": True, "off": False, "auto": None}[args.tile]
    out = pipe([PROMPT] * args.batch, height=args.side, width=args.side, num_inference_steps=args.steps,
               guidance_scale=1.0 if args.cfg == "none" else 7.5,
               cfg_mode="batched" if args.cfg == "none" else args.cfg, seed=0, scheduler="euler",
               tile_vae=tile, image=image, strength=1.0 if args.img2img else None, output_type="pil")
    marks["images"] = status_kib("VmHWM") / 1024
    latent = args.side // pipe.vae_factor
    tiling = pipe.tiling(latent, latent, tile)
    print(json.dumps({"marks_mib": marks, "vae_tile": tiling.tile if tiling else None,
                      "vae_tile_batch": tiling.batch if tiling else 1, "vae_overlap": tiling.overlap if tiling else None,
                      "shared_arena": pipe.footprint.shared_arena,
                      "images": len(out.images), "timings": out.timings}))
    return 0


def measure(directory: Path, case: dict, steps: int, threads: int) -> dict:
    """Run one case in a fresh process; its peak RSS comes from the kernel via wait4."""
    cmd = [sys.executable, __file__, "--child", str(directory), "--side", str(case["side"]),
           "--batch", str(case["batch"]), "--cfg", case["cfg"], "--tile", case["tile"],
           "--steps", str(steps), "--threads", str(threads)] + (["--img2img"] if case["img2img"] else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"child failed ({proc.returncode}): {stderr[-2000:]}")
    result = json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("{")))
    return with_peak(result, usage.ru_maxrss / 1024)


def with_peak(result: dict, ru_maxrss_mib: float) -> dict:
    """The child's own VmHWM at the end is the measurement. wait4's ru_maxrss is kept as a cross-check:
    Linux carries the parent's peak over fork and exec into it, so it can only be larger."""
    result["ru_maxrss_mib"] = ru_maxrss_mib
    result["peak_rss_mib"] = result["marks_mib"]["images"]
    return result


def footprint_of(directory: Path) -> dict:
    from dataclasses import asdict

    from linfusion.runtime.manifest import load_manifest
    from linfusion.runtime.memory import Footprint

    manifest = load_manifest(directory, verify=False)
    footprint = asdict(Footprint.from_export(directory, manifest))
    preset = CONFIGS / str(manifest.source.get("preset"))
    if footprint["unet_block_channels"] is None and preset.is_dir():  # manifests before the channel facts
        for key, folder in (("unet_block_channels", "unet"), ("vae_block_channels", "vae")):
            footprint[key] = json.loads((preset / folder / "config.json").read_text())["block_out_channels"]
    return footprint


def estimate_row(row: dict, channels: bool = True):
    """The estimate for a measured row, from the footprint stored with it (the export may be gone)."""
    from linfusion.runtime.memory import Footprint, estimate

    stored = dict(row["footprint"])
    for key in ("text_encoders", "unet_block_channels", "vae_block_channels"):
        stored[key] = tuple(stored[key]) if stored[key] else None
    if not channels:
        stored.update(unet_block_channels=None, vae_block_channels=None)
    return estimate(Footprint(**stored), height=row["side"], width=row["side"], batch=row["batch"],
                    cfg=row["cfg"], vae_tile=row["vae_tile"], img2img=row["img2img"], backend="onnxruntime",
                    steps=row["steps"], vae_tile_batch=row.get("vae_tile_batch", 1), vae_overlap=row.get("vae_overlap"))


def add_estimate(row: dict) -> dict:
    est, fallback = estimate_row(row), estimate_row(row, channels=False)
    row.update(estimate_mib=est.total / MIB, estimate_stages_mib={k: v / MIB for k, v in est.stages.items()},
               ratio=est.total / MIB / row["peak_rss_mib"],
               fallback_ratio=fallback.total / MIB / row["peak_rss_mib"])
    return row


def table(rows: list[dict]) -> str:
    head = ("| model | side (px) | batch | CFG | steps | VAE tile (latent) | img2img | loaded (MiB) "
            "| measured peak (MiB) | estimate (MiB) | estimate / measured | without widths / measured |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['model']} | {r['side']} | {r['batch']} | {r['cfg']} | {r['steps']} | {r['vae_tile'] or '–'} | "
                     f"{'yes' if r['img2img'] else 'no'} | {r['marks_mib']['loaded']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['estimate_mib']:.0f} | {r['ratio']:.2f} | {r['fallback_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", type=Path, dest="directory", help=argparse.SUPPRESS)
    p.add_argument("--side", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cfg", default="batched")
    p.add_argument("--tile", default="auto")
    p.add_argument("--img2img", action="store_true")
    p.add_argument("--export", action="append", default=[], help="NAME=DIR, an export to measure")
    p.add_argument("--cases", help="comma-separated NAME:SIDE:BATCH:CFG:TILE[:img2img]")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", type=Path, default=RESULTS / "memory_guard.json")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in --output (re-estimated); without --cases only re-estimates")
    args = p.parse_args(argv)
    if args.directory:
        return child(args)
    exports = dict(item.split("=", 1) for item in args.export)
    previous = json.loads(args.output.read_text()) if args.append and args.output.is_file() else {}
    rows = previous.get("rows", [])
    for row in rows:  # stored rows: a fresh footprint while their export is at hand, and the current model
        if "ru_maxrss_mib" not in row:  # rows measured before the VmHWM peak
            with_peak(row, row["peak_rss_mib"])
        if row["model"] in exports:
            row["footprint"] = {**footprint_of(Path(exports[row["model"]])),
                                "shared_arena": row["footprint"].get("shared_arena", False)}
        add_estimate(row)
    for case in map(parse_case, args.cases.split(",") if args.cases else []):
        directory = Path(exports[case["model"]])
        result = measure(directory, case, args.steps, args.threads)
        footprint = {**footprint_of(directory), "shared_arena": result.get("shared_arena", False)}
        row = add_estimate({**case, **result, "steps": args.steps, "threads": args.threads,
                            "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "footprint": footprint})
        rows.append(row)
        print(f"{case}: peak {row['peak_rss_mib']:.0f} MiB, estimate {row['estimate_mib']:.0f} MiB "
              f"({row['ratio']:.2f}x); marks {json.dumps({k: round(v) for k, v in row['marks_mib'].items()})}",
              flush=True)
    rows.sort(key=lambda r: (r["model"] != "tiny", r["model"], r["side"], r["batch"], r["steps"], r["cfg"]))
    from importlib import metadata

    command = "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:]))
    # Measured by: the commands that measured the rows; a run without --cases only re-estimates them.
    measured_by = previous.get("measured_by", [previous["command"]] if "command" in previous else [])
    record = {"study": "memory_guard", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": command, "measured_by": measured_by + ([command] if args.cases else []),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "memory_gib": round(meminfo_kib("MemTotal") / 2**20, 1),
                          "onnxruntime": metadata.version("onnxruntime"), "numpy": metadata.version("numpy")},
              "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(table(rows))
    for name in sorted({r["model"] for r in rows}):
        ratios = [r["ratio"] for r in rows if r["model"] == name]
        fallback = [r["fallback_ratio"] for r in rows if r["model"] == name]
        print(f"\n{name}: estimate / measured {min(ratios):.2f} to {max(ratios):.2f}; without the widths "
              f"{min(fallback):.2f} to {max(fallback):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
