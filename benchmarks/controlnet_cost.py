"""ControlNet costs on ONNX Runtime CPU, side by side in one process (docs/controlnet.md).

1. The zeros path: a plain export's UNet against a ControlNet export's UNet fed zero residuals
   (what plain text-to-image runs on a ControlNet export), calls interleaved.
2. A ControlNet call against a UNet call (with residuals) at each size.

    python benchmarks/controlnet_cost.py --plain DIR --controlnet DIR --sizes 512,1024 --repeats 3

DIR: export directories (``linfusion-export --model sd15 --random-weights --components unet`` and
the same with ``--controlnet random --components unet,controlnet``); ``--torch-sizes`` adds PyTorch
eager rows (builds the models itself). Prints a markdown table and
writes JSON with ``--json``. Median of ``--repeats`` timed calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def session(folder: Path, name: str, threads: int):
    import onnxruntime as ort
    from linfusion.runtime.manifest import load_manifest

    spec = load_manifest(folder, verify=False).components[name]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(folder / spec.path), options, providers=["CPUExecutionProvider"]), spec


def feed(spec, batch: int, latent: int, vae_factor: int, rng, zeros: bool = True) -> dict[str, np.ndarray]:
    """Random inputs from the spec's shapes; residual (``_div``) inputs zero when ``zeros``."""
    from linfusion.runtime.contract import Axis, ControlNetIO
    from linfusion.runtime.controlnet import residual_inputs

    residuals = {t.name for t in residual_inputs(spec)}
    sizes = {Axis.BATCH: batch}
    out = {}
    for tensor in spec.inputs:
        dims = []
        for d in tensor.shape:
            resolved = None if isinstance(d, int) or d == Axis.BATCH else Axis.resolve(d)
            if isinstance(d, int):
                dims.append(d)
            elif resolved is None:
                dims.append(sizes[d])
            else:
                base, divisor = resolved
                side = latent * (vae_factor if Axis.UNITS[base] == "image" else 1)
                dims.append(side // divisor)
        if tensor.name in (ControlNetIO.timestep, ControlNetIO.conditioning_scale):
            value = np.full(dims, 500.0 if tensor.name == ControlNetIO.timestep else 1.0, np.float32)
        elif tensor.name in residuals and zeros:
            value = np.zeros(dims, tensor.dtype)
        else:
            value = rng.standard_normal(dims).astype(tensor.dtype)
        out[tensor.name] = value
    return out


def timed(sess, inputs, repeats: int) -> tuple[float, float]:
    """Median wall-clock and process CPU seconds per call (CPU time is less hit by other processes)."""
    sess.run(None, inputs)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        sess.run(None, inputs)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def medians(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def compare(what: str, size: int, repeats: int, a: tuple, b: tuple) -> dict:
    """(label, session, inputs) A and B, calls interleaved so that load changes hit both."""
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(timed(a[1], a[2], 1))
        times_b.append(timed(b[1], b[2], 1))
    (wa, ca), (wb, cb) = medians(times_a), medians(times_b)
    row = {"what": what, "size": size, "a": a[0], "b": b[0], "a_wall_s": wa, "b_wall_s": wb, "a_cpu_s": ca,
           "b_cpu_s": cb}
    print(row, flush=True)
    return row


def torch_rows(sizes: list[int], threads: int) -> list[dict]:
    """PyTorch eager, one call each (in size order): the LinFusion UNet against a seeded random
    ControlNet (softmax SDPA, memory-light on CPU) on the real-size SD-1.5 architecture."""
    import torch
    from linfusion.export.controlnet import attach_controlnets, controlnets_of

    from linfusion import load_pipeline

    torch.set_num_threads(threads)
    loaded = load_pipeline("sd15", random_weights=True)
    attach_controlnets(loaded, ["random"])
    unet, control = loaded.pipeline.unet.eval(), controlnets_of(loaded.pipeline)["controlnet"]
    rows = []
    for size in sizes:
        x, t = torch.randn(1, 4, size // 8, size // 8), torch.tensor([500.0])
        context, image = torch.randn(1, 77, unet.config.cross_attention_dim), torch.rand(1, 3, size, size)
        calls = {"b": (control, {"controlnet_cond": image}), "a": (unet, {})}
        row = {"what": "step (PyTorch eager)", "size": size, "a": "UNet (LinFusion)", "b": "ControlNet (softmax)"}
        with torch.no_grad():
            for side, (model, extra) in calls.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                model(x, t, context, return_dict=False, **extra)
                row[f"{side}_wall_s"], row[f"{side}_cpu_s"] = time.perf_counter() - start, time.process_time() - start_cpu
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plain", type=Path, required=True)
    p.add_argument("--controlnet", type=Path, required=True)
    p.add_argument("--sizes", default="512", help="image sides in pixels, comma-separated")
    p.add_argument("--zeros-sizes", default="512", help="sizes for the zeros-path comparison")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--torch-sizes", default="", help="also PyTorch eager at these sizes (e.g. 512,1024)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from linfusion.runtime.contract import CONTROLNET, component_kind
    from linfusion.runtime.manifest import load_manifest

    manifest = load_manifest(args.controlnet, verify=False)
    factor = manifest.pipeline.vae_scale_factor
    control_name = next(n for n, s in manifest.components.items() if component_kind(s.kind) is CONTROLNET)
    rng = np.random.default_rng(0)
    rows = []
    unet_cn, spec_cn = session(args.controlnet, "unet", args.threads)
    zeros_sizes = [int(s) for s in args.zeros_sizes.split(",") if s]
    if zeros_sizes:
        plain, spec_plain = session(args.plain, "unet", args.threads)
        for size in zeros_sizes:
            f_cn = feed(spec_cn, args.batch, size // factor, factor, rng)
            f_plain = {k: v for k, v in f_cn.items() if k in {t.name for t in spec_plain.inputs}}
            rows.append(compare("zeros path", size, args.repeats, ("plain UNet", plain, f_plain),
                                ("ControlNet export's UNet, zeros", unet_cn, f_cn)))
        del plain
    control, spec_control = session(args.controlnet, control_name, args.threads)
    for size in (int(s) for s in args.sizes.split(",") if s):
        latent = size // factor
        rows.append(compare("step", size, args.repeats,
                            ("UNet (LinFusion)", unet_cn, feed(spec_cn, args.batch, latent, factor, rng, zeros=False)),
                            ("ControlNet (softmax)", control, feed(spec_control, args.batch, latent, factor, rng))))
    if args.torch_sizes:
        del unet_cn, control
        rows += torch_rows([int(s) for s in args.torch_sizes.split(",")], args.threads)
    record = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "threads": args.threads},
              "date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "batch": args.batch, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    print("| comparison | px | A | B | A wall (s) | B wall (s) | B/A wall | B/A CPU time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['size']} | {r['a']} | {r['b']} | {r['a_wall_s']:.2f} | {r['b_wall_s']:.2f} | "
              f"{r['b_wall_s'] / r['a_wall_s']:.3f} | {r['b_cpu_s'] / r['a_cpu_s']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
