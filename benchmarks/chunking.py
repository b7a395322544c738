"""Study: what token chunking (``linfusion-export --tensor-limit``) costs per UNet step.

    python benchmarks/chunking.py              # sd15-small, 1024 px, UNet batch 1 and 2, 5 repeats
    python benchmarks/chunking.py --quick      # 512 px, 3 repeats
    python benchmarks/chunking.py --tiny       # smoke run (tiny preset, 64 px)

The chunked UNet has the chunk counts ``linfusion-export`` gives SD-1.5 at its default max size
16384x8192 and limit 2^31 - 1 (the level-0 feed-forwards in 3 token windows, the level-1 ones in
2). sd15-small has SD-1.5's blocks with a quarter of its channels, so a quarter of the limit gives
it the same counts; the study plans SD-1.5 itself on meta weights (a shape-only run, nothing
allocated) and checks that the two plans agree. Both UNets are exported from the same weights
(fp32, parity skipped: the study compares their outputs itself), then run on ONNX Runtime CPU
with the runtime's session settings, in pairs of alternating order; reported are the cost of the
medians and the median of the paired ratios (the steadier on a shared machine). Target: <= 5 %.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import harness
import models
import numpy as np

LIMIT = 2**31 - 1
MAX_SIZE = (16384, 8192)
UNCHUNKED_LIMIT = 2**62


def reference_plan() -> dict[str, int]:
    """SD-1.5's chunk counts at the default max size and limit (meta weights)."""
    import torch
    from linfusion.export.chunking import plan_unet
    from linfusion.export.components import unet_component

    from linfusion.checkpoint import LinFusion
    from linfusion.presets import build_random_pipeline, get_preset

    preset = get_preset("sd15")
    pipe = build_random_pipeline(preset, device="meta")
    with torch.device("meta"):
        LinFusion.from_unet(pipe.unet).mount(pipe.unet)
    plan = plan_unet(unet_component(pipe, False, 8, torch.float32), MAX_SIZE, LIMIT, 8, 64)
    return {name: k for name, k in plan.chunks.items() if k > 1}


def reusable(folder: Path, variant: str, limit: int) -> bool:
    """An export left in --workdir by an earlier run of the same variant and limit (same seed)."""
    from linfusion.runtime.manifest import ManifestError, load_manifest

    try:
        facts = load_manifest(folder, verify=False).pipeline
    except ManifestError:
        return False
    marker = folder / "variant.txt"
    return marker.is_file() and marker.read_text() == variant and facts.tensor_limit == limit


def session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session as the runtime's backend makes it (all graph optimisations)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_batch(sessions: dict[str, Any], batch: int, latent: int, context: int, repeats: int) -> dict[str, Any]:
    from linfusion.runtime.contract import UNetIO

    rng = np.random.default_rng(batch)
    feed = {UNetIO.sample: rng.standard_normal((batch, 4, latent, latent), dtype=np.float32),
            UNetIO.timestep: np.full(batch, 500.0, np.float32),
            UNetIO.encoder_hidden_states: rng.standard_normal((batch, 77, context), dtype=np.float32)}
    outputs = {name: s.run(None, feed)[0] for name, s in sessions.items()}  # also the warm-up
    rel = float(np.abs(outputs["chunked"] - outputs["unchunked"]).max() / np.abs(outputs["unchunked"]).max())
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for round_ in range(repeats):  # pairs, in alternating order, so that load changes hit both sides alike
        for name in sorted(sessions, reverse=round_ % 2 == 1):
            start = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append(time.perf_counter() - start)
    med = {name: harness.median(t) for name, t in times.items()}
    ratios = [c / u for c, u in zip(times["chunked"], times["unchunked"])]
    return {"unet_batch": batch, "chunked_s": med["chunked"], "unchunked_s": med["unchunked"],
            "cost_pct": 100 * (med["chunked"] / med["unchunked"] - 1),
            "cost_paired_pct": 100 * (harness.median(ratios) - 1), "max_rel_diff": rel, "runs": times}


def main(argv: list[str] | None = None) -> int:
    p = models.study_parser(__doc__, harness.RESULTS)
    p.add_argument("--size", type=int, default=1024, help="image side in px (default 1024)")
    p.add_argument("--batches", default="1,2", help="UNet batches to time (2: a step with batched guidance)")
    args = p.parse_args(argv)
    if args.tiny:
        args.variant, args.size, args.repeats, args.batches = "tiny", 64, 1, "1"
    elif args.quick:
        args.size, args.repeats = 512, 3

    import torch
    from linfusion.export.chunking import plan_unet
    from linfusion.export.components import unet_component
    from linfusion.export.exporter import export_pipeline

    loaded, _ = models.build(args.variant)
    unet = loaded.pipeline.unet
    limit = LIMIT * unet.config.block_out_channels[0] // 320  # SD-1.5's level-0 width is 320 channels
    multiple = 2**unet.num_upsamplers
    plan = plan_unet(unet_component(loaded.pipeline, False, multiple, torch.float32), MAX_SIZE, limit, 8, 8 * multiple)
    chunks = {name: k for name, k in plan.chunks.items() if k > 1}
    reference = None if args.variant == "tiny" else reference_plan()
    if reference is not None and reference != chunks:
        raise SystemExit(f"{args.variant} at limit {limit} is chunked unlike SD-1.5: {chunks} vs {reference}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="chunking-") as tmp:
        folder = args.workdir or Path(tmp)
        paths = {}
        for name, tensor_limit in (("chunked", limit), ("unchunked", UNCHUNKED_LIMIT)):
            out = folder / f"chunking-unet-{name}"
            if not reusable(out, args.variant, tensor_limit):
                export_pipeline(loaded, out, components=["unet"], force=True, skip_parity=True, max_size=MAX_SIZE,
                                tensor_limit=tensor_limit, progress=lambda line: print(line, flush=True))
                (out / "variant.txt").write_text(args.variant)
            paths[name] = out / "unet" / "model.onnx"
        sessions = {name: session(path, args.threads) for name, path in paths.items()}
        for batch in (int(b) for b in args.batches.split(",")):
            rows.append(time_batch(sessions, batch, args.size // 8, unet.config.cross_attention_dim, args.repeats))
            r = rows[-1]
            print(f"UNet batch {batch} at {args.size} px: chunked {r['chunked_s']:.3f} s, unchunked "
                  f"{r['unchunked_s']:.3f} s, cost {r['cost_pct']:+.2f} % (paired {r['cost_paired_pct']:+.2f} %), "
                  f"max rel diff {r['max_rel_diff']:.1e}", flush=True)

    table = harness.markdown_table(
        ["UNet batch", "chunked (s)", "unchunked (s)", "cost of medians (%)", "median paired cost (%)",
         "max rel diff"],
        [[r["unet_batch"], r["chunked_s"], r["unchunked_s"], r["cost_pct"], r["cost_paired_pct"], r["max_rel_diff"]]
         for r in rows])
    print(table)
    record = {"study": "chunking", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": harness.command_line(), "machine": harness.machine(), "variant": args.variant,
              "size_px": args.size, "threads": args.threads, "repeats": args.repeats, "max_size": list(MAX_SIZE),
              "tensor_limit": limit, "chunks": chunks, "same_chunks_as_sd15": reference is not None,
              "target_pct": 5.0, "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "chunking.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
