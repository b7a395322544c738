"""Study 3: the runtime's time per step outside model calls, as a share of the step.

    python benchmarks/overhead.py --quick     # sd15-small, 256 and 512 px, 10 steps, 3 repeats
    python benchmarks/overhead.py             # sd15-small, 256, 512 and 1024 px, 20 steps, 5 repeats

The UNet runner's ONNX Runtime session is wrapped so that every ``session.run`` adds its wall
time to a counter; the runner's own ``run`` (input dtype/contiguity conversion) is counted
separately. Overhead per step = (denoise loop time - session time) / steps: CFG batching and
splitting, guidance arithmetic, the numpy scheduler and the runner's input conversion.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import models

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


class TimedSession:
    """Stands in for an onnxruntime.InferenceSession and adds each run's wall time to ``seconds``."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.seconds = 0.0

    def _timed(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def run(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(self.session.run, *args, **kwargs)

    def run_with_iobinding(self, *args: Any, **kwargs: Any) -> Any:
        """The denoising loop's path (I/O binding): the model call alone, copies excluded."""
        return self._timed(self.session.run_with_iobinding, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def measure(pipe: Any, size: int, steps: int, session: TimedSession) -> dict[str, float]:
    session.seconds = 0.0
    out = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, seed=0, scheduler="euler",
               tile_vae=False, output_type="np")
    loop = out.timings["denoise"] / steps
    model = session.seconds / steps
    return {"loop_per_step_s": loop, "session_per_step_s": model,
            "predict_per_step_s": out.timings["unet_per_step"],  # the pipeline's own UNet timer (CFG incl.)
            "outside_model_per_step_ms": (loop - model) * 1e3, "overhead_share_pct": 100 * (loop - model) / loop}


def main(argv: list[str] | None = None) -> int:
    p = models.study_parser(__doc__, harness.RESULTS, steps=20)
    p.add_argument("--sizes", default="256,512,1024")
    args = p.parse_args(argv)
    if args.tiny:
        args.variant, args.sizes, args.steps, args.repeats, args.threads = "tiny", "64", 2, 1, 1
    elif args.quick:
        args.sizes, args.steps, args.repeats = "256,512", 10, 3
    sizes = [int(s) for s in args.sizes.split(",")]

    from linfusion.runtime import Pipeline
    from linfusion.runtime.contract import UNET

    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        folder = models.assets(args.variant, args.workdir or Path(tmp))
        pipe = Pipeline.from_export(folder / "export", backend="onnxruntime", intra_op_threads=args.threads)
        session = TimedSession(pipe.runners[UNET.name].session)
        pipe.runners[UNET.name].session = session
        rows = []
        for size in sizes:
            measure(pipe, size, args.steps, session)  # warm-up
            runs = [measure(pipe, size, args.steps, session) for _ in range(args.repeats)]
            rows.append({"side_px": size, **{k: harness.median([r[k] for r in runs]) for k in runs[0]},
                         "runs": runs})
            print(f"{size} px: {rows[-1]['overhead_share_pct']:.3f} % outside the model", flush=True)

    table = harness.markdown_table(
        ["side (px)", "loop per step (s)", "UNet session.run per step (s)", "outside model (ms/step)",
         "share of step (%)"],
        [[r["side_px"], r["loop_per_step_s"], r["session_per_step_s"], r["outside_model_per_step_ms"],
          r["overhead_share_pct"]] for r in rows])
    notes = [(f"Model: {args.variant}, random weights; {args.steps} Euler steps, CFG 7.5 batched (UNet batch 2), "
             f"{args.threads} ORT threads; medians of {args.repeats} runs after one warm-up. Target: < 1 %.")]
    harness.write_results("overhead", {"variant": args.variant, "steps": args.steps, "threads": args.threads,
                                       "repeats": args.repeats, "rows": rows}, table, notes, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
