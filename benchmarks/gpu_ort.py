"""GPU: the torch-free runtime on ONNX Runtime's CUDA provider against diffusers + LinFusion in PyTorch.

    python benchmarks/gpu_ort.py --out DIR               # GPU machine (benchmarks/gpu_ort.sh sets it up and runs it)
    python benchmarks/gpu_ort.py --dry-run --out DIR     # the same code path on the CPU: tiny-sd, tiny sizes
    python benchmarks/gpu_ort.py --skip-export WORK ...  # reuse the export/, diffusers/, linfusion/ of a run's WORK

Three child processes of this script run one after another (WORK/config.json holds the settings):
  export  sd15 at real size, seeded random weights, fp16 (text_encoder, unet, vae_decoder) -> WORK/export, and the
          same weights as WORK/diffusers + WORK/linfusion (benchmarks/models.py; the exporter, parity check unless --skip-parity);
  ort     the runtime's public API, ``Pipeline.from_export(WORK/export, providers=[CUDA, CPU])``: UNet s/step via
          ``pipe.runners["unet"].run`` per size (batch 2); ``pipe(...)`` end to end with its ``.timings`` and the
          time per step outside ``runners["unet"].run``; fp16 finiteness (batch 1) at 4096 px, beyond while time is
          left; the whole image against the CPU provider's (PSNR, bound: validation's fp16 40 dB);
  torch   the same weights in PyTorch fp16: LinFusion eager and diffusers' SDPA UNet per size, the LinFusion UNet
          at the finiteness sizes, diffusers + LinFusion end to end. The runtime's UNet outputs (same inputs) are
          compared with LinFusion eager's at every size (max relative error, cosine).
Each phase rewrites WORK/phase_<name>.json after every item (a phase killed at the deadline keeps what it measured;
a failing item is recorded and the next runs); after each phase the parent rewrites OUT/gpu_ort.json and .md.

Peak device memory: ORT has no Python API for its CUDA arena's statistics, so each phase reads
``nvidia-smi --query-gpu=timestamp,memory.used -lms 50`` in a background thread; a row's figure is the largest
sample during its runs minus the idle reading taken before any phase (whole GPU, used by that phase's process
alone: CUDA context and allocator caches included). PyTorch rows add torch.cuda.max_memory_allocated/_reserved.
ORT's arena never shrinks, so sizes run in increasing order. --dry-run samples the process's host RSS instead.

linfusion is imported from this checkout: unless it is installed from here (and LINFUSION_FROM_CHECKOUT=1 is
unset), ``use_checkout`` puts the repository root on sys.path and registers export/, runtime/ and engines/ as
linfusion.export/.runtime/.engines (pyproject's package-dir mapping); nothing is installed.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import inspect
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
COMPONENTS = ["text_encoder", "unet", "vae_decoder"]  # text to image needs no vae_encoder
ENGINES = {"runtime": "runtime (ORT)", "linfusion_eager": "LinFusion eager", "sdpa": "SDPA"}
DRY = {"variant": "tiny", "sizes": "64,128", "steps": 2, "e2e_size": 64, "e2e_repeats": 1, "finite_sizes": "256,512",
       "psnr_size": 64, "psnr_steps": 2, "repeats": 2, "warmup": 1, "providers": "CPUExecutionProvider"}


def use_checkout() -> str:
    """Make ``import linfusion...`` resolve to this checkout; returns how."""
    spec = importlib.util.find_spec("linfusion")
    if os.environ.get("LINFUSION_FROM_CHECKOUT") != "1" and spec and spec.origin \
            and Path(spec.origin).resolve().is_relative_to(ROOT):
        return "installed from this checkout"
    sys.path.insert(0, str(ROOT))
    for name in [m for m in sys.modules if m == "linfusion" or m.startswith("linfusion.")]:
        del sys.modules[name]
    import linfusion

    for sub in ("export", "runtime", "engines"):
        sub_spec = importlib.util.spec_from_file_location(
            f"linfusion.{sub}", ROOT / sub / "__init__.py", submodule_search_locations=[str(ROOT / sub)])
        module = importlib.util.module_from_spec(sub_spec)
        sys.modules[sub_spec.name] = module
        sub_spec.loader.exec_module(module)
        setattr(linfusion, sub, module)
    return "checkout on sys.path, export/runtime/engines aliased"


# --- helpers (unit-tested in tests/test_gpu_ort_script.py) ---------------------------------------------

def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB of two images in [0, 1]; None when they are identical (infinite)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return None if mse == 0 else 10.0 * math.log10(1.0 / mse)


def parse_smi_line(line: str) -> float | None:
    """MiB from a line of ``nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits``."""
    try:
        return float(line.strip().rsplit(",", 1)[-1])
    except ValueError:
        return None  # "[N/A]", "[Not Supported]", an error message


def smi_samples(index: str = "0") -> Iterator[float | None]:
    proc = subprocess.Popen(["nvidia-smi", "-i", index, "--query-gpu=timestamp,memory.used",
                             "--format=csv,noheader,nounits", "-lms", "50"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
    atexit.register(proc.kill)
    for line in proc.stdout:
        yield parse_smi_line(line)


def rss_samples(interval: float = 0.02) -> Iterator[float | None]:
    while True:
        status = Path("/proc/self/status").read_text().splitlines()
        yield next(int(x.split()[1]) / 1024 for x in status if x.startswith("VmRSS"))
        time.sleep(interval)


class MemoryPoller:
    """Consumes a stream of MiB samples in a daemon thread; ``peak()`` is the largest since ``mark()``."""

    def __init__(self, source: str, samples: Iterable[float | None], idle: float = 0.0, settle: float = 0.15):
        self.source, self.idle, self.settle = source, idle, settle
        self.last: float | None = None
        self.top: float | None = None
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._consume, args=(iter(samples),), daemon=True)
        self.thread.start()

    def _consume(self, samples: Iterator[float | None]) -> None:
        for value in samples:
            if value is not None:
                with self._lock:
                    self.last, self.top = value, value if self.top is None else max(self.top, value)

    def mark(self) -> None:
        with self._lock:
            self.top = self.last

    def peak(self) -> float | None:
        """MiB above idle, after ``settle`` s so that the samples of the last moments are in."""
        time.sleep(self.settle)
        with self._lock:
            return None if self.top is None else round(self.top - self.idle, 1)


def make_poller(dry_run: bool, idle: float) -> MemoryPoller:
    if not dry_run and shutil.which("nvidia-smi"):
        return MemoryPoller("nvidia-smi memory.used (whole GPU) minus idle, 50 ms samples", smi_samples(), idle)
    return MemoryPoller("host RSS of the phase process (dry run, no GPU), 20 ms samples", rss_samples())


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[dict[str, Any], Any]:
    """Seconds per call (median after warm-up calls, every repeat, the first call) and the last result."""
    times = []
    for _ in range(warmup + repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times[warmup:]), "all_seconds": times[warmup:],
            "first_call_s": times[0]}, result


def unet_feed(batch: int, latent: int, channels: int, context: int, seed: int = 0) -> dict[str, np.ndarray]:
    from linfusion.runtime.contract import UNetIO as IO

    rng = np.random.RandomState(seed)
    return {IO.sample: rng.standard_normal((batch, channels, latent, latent)).astype(np.float16),
            IO.timestep: np.full(batch, 500.0, dtype=np.float32),
            IO.encoder_hidden_states: rng.standard_normal((batch, 77, context)).astype(np.float16)}


def finite_summary(out: np.ndarray) -> dict[str, Any]:
    x = np.asarray(out, np.float32)
    ok = bool(np.isfinite(x).all())
    return {"finite": ok, "std": float(x.std()) if ok else None, "max_abs": float(np.abs(x).max()) if ok else None}


def rel_error(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    g, r = np.asarray(got, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    return {"max_rel_error": float(np.abs(g - r).max() / np.abs(r).max()),
            "cosine": float(g @ r / (np.linalg.norm(g) * np.linalg.norm(r)))}


def runtime_options(pipeline_cls: Any, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """from_export's keyword arguments, using the newer backend options only where the API has them."""
    from linfusion.runtime.backends.onnxruntime import OnnxRuntimeBackend

    params = inspect.signature(pipeline_cls.from_export).parameters
    backend = inspect.signature(OnnxRuntimeBackend.__init__).parameters
    io = backend.get("io_binding")
    kwargs: dict[str, Any] = {"backend": "onnxruntime", "providers": args.providers}
    if args.provider_options and "provider_options" in params:
        kwargs["provider_options"] = json.loads(args.provider_options)
    if args.io_binding != "default" and "io_binding" in params:
        kwargs["io_binding"] = args.io_binding == "on"
    return kwargs, {"from_export": list(params), "backend": [p for p in backend if p != "self"],
                    "io_binding_default": None if io is None or io.default is io.empty else io.default,
                    "passed": {k: v for k, v in kwargs.items() if k != "backend"}}


def clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python numbers, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value.item() if isinstance(value, np.generic) else value


class Phase:
    """One phase's record, rewritten to WORK/phase_<name>.json after every item."""

    def __init__(self, work: Path, name: str, deadline_at: float) -> None:
        self.path, self.deadline_at = work / f"phase_{name}.json", deadline_at
        self.data: dict[str, Any] = {"errors": []}

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(clean(self.data), indent=1))
        tmp.replace(self.path)

    def add(self, key: str, value: Any) -> None:
        self.put(key, self.data.get(key, []) + [value])

    def attempt(self, label: str, fn: Callable[[], None], needs_s: float = 0.0) -> None:
        """Run one item; its exception, or too little time left for it, is recorded instead of raised."""
        left = self.deadline_at - time.time()
        if left < needs_s:
            return self.add("skipped", f"{label}: {left:.0f} s left, needs about {needs_s:.0f} s")
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one item's failure must not lose the others
            self.add("errors", f"{label}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
            print(f"[{label}] failed: {exc!r}", flush=True)


# --- the phases (child processes) ----------------------------------------------------------------------

def phase_export(args: argparse.Namespace, work: Path, rec: Phase) -> None:
    import models
    import torch
    from linfusion.export.exporter import export_pipeline

    start = time.perf_counter()
    loaded, _ = models.build(args.variant, seed=0, dtype=torch.float16, save_to=work)
    rec.put("build_s", time.perf_counter() - start)
    export_pipeline(loaded, work / "export", precision="fp16", components=COMPONENTS, force=True,
                    skip_parity=args.skip_parity, progress=lambda line: print(line, flush=True))
    rec.put("seconds", time.perf_counter() - start)
    (work / "gpu_ort_export.json").write_text(json.dumps({"variant": args.variant, "precision": "fp16"}))


def phase_ort(args: argparse.Namespace, work: Path, rec: Phase) -> None:
    import onnxruntime as ort
    from linfusion.runtime import Pipeline

    cuda = "CUDAExecutionProvider" in args.providers
    if cuda and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # the image's CUDA 13 / cuDNN 9 wheels, which gpu_ort.sh links beside the install
    rec.put("onnxruntime", {"version": ort.__version__, "file": ort.__file__, "build": ort.get_build_info(),
                            "cuda_version": getattr(ort, "cuda_version", None),
                            "available": ort.get_available_providers()})
    kwargs, features = runtime_options(Pipeline, args)
    rec.put("runtime", features)
    poller = make_poller(args.dry_run, args.idle_mib)
    rec.put("memory_source", poller.source)
    start = time.perf_counter()
    pipe = Pipeline.from_export(work / "export", **kwargs)
    unet = pipe.runners["unet"]
    used = unet.session.get_providers() if hasattr(getattr(unet, "session", None), "get_providers") else None
    rec.put("load", {"seconds": time.perf_counter() - start, "peak_mib": poller.peak(), "session_providers": used})
    if cuda and (used or ["?"])[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"the UNet session runs on {used}, not CUDA: the CUDA provider did not load "
                           f"(see preload_dlls' messages above)")
    from linfusion.runtime.contract import UNetIO as IO

    channels, context = unet.spec.input(IO.sample).shape[1], unet.spec.input(IO.encoder_hidden_states).shape[2]

    def steps(side: int) -> None:
        feed = unet_feed(args.batch, side // pipe.vae_factor, channels, context)
        poller.mark()
        row, out = timed(lambda: unet.run(feed, [IO.out_sample])[IO.out_sample], args.warmup, args.repeats)
        np.save(work / f"step_runtime_{side}.npy", out)
        rec.add("unet_step", {"engine": "runtime", "side_px": side, "batch": args.batch, **row,
                              "device_mib": poller.peak()})
        print(f"runtime {side} px: {row['seconds']:.4f} s/step", flush=True)

    def end_to_end() -> None:
        inside, runs = [0.0], []
        session = getattr(unet, "session", None)

        class Timed:
            """The UNet's ORT session with its model calls timed (plain run and the I/O-binding path)."""

            def __getattr__(self, name: str) -> Any:
                return getattr(session, name)

            def _timed(self, call: Any, *a: Any, **k: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return call(*a, **k)
                finally:
                    inside[0] += time.perf_counter() - t0

            def run(self, *a: Any, **k: Any) -> Any:
                return self._timed(session.run, *a, **k)

            def run_with_iobinding(self, *a: Any, **k: Any) -> Any:
                return self._timed(session.run_with_iobinding, *a, **k)

        poller.mark()
        if session is not None:
            unet.session = Timed()  # the denoising loop calls the UNet's session, bound or not
        try:
            for _ in range(1 + args.e2e_repeats):  # the first is a warm-up (cuDNN algorithm search, VAE)
                inside[0] = 0.0
                out = pipe(PROMPT, height=args.e2e_size, width=args.e2e_size, num_inference_steps=args.steps,
                           guidance_scale=7.5, seed=0, scheduler="euler", output_type="np")
                loop = out.timings["denoise"] / args.steps
                if session is None:  # another backend: the pipeline's own timer around each UNet call
                    inside[0] = out.timings["unet_per_step"] * args.steps
                runs.append({**out.timings, "unet_run_per_step_s": inside[0] / args.steps,
                             "outside_unet_ms_per_step": (loop - inside[0] / args.steps) * 1e3})
        finally:
            if session is not None:
                unet.session = session
        med = {k: statistics.median(r[k] for r in runs[1:]) for k in runs[1]}
        med["outside_unet_share_pct"] = med["outside_unet_ms_per_step"] / 10 / (med["denoise"] / args.steps)
        rec.put("end_to_end", {"side_px": args.e2e_size, "steps": args.steps, "images": 1, "cfg": "batched",
                               **med, "runs": runs, "device_mib": poller.peak()})

    def finite(side: int) -> None:
        feed = unet_feed(1, side // pipe.vae_factor, channels, context, seed=1)
        poller.mark()
        start = time.perf_counter()
        out = unet.run(feed, [IO.out_sample])[IO.out_sample]
        np.save(work / f"finite_runtime_{side}.npy", out)
        rec.add("finite", {"side_px": side, "batch": 1, "seconds": time.perf_counter() - start,
                           **finite_summary(out), "device_mib": poller.peak()})

    def against_cpu() -> None:
        from linfusion.export.comparison.tolerances import IMAGE_TOLERANCES

        cpu = Pipeline.from_export(work / "export", backend="onnxruntime", providers=["CPUExecutionProvider"],
                                   verify=False)
        a, b = (p(PROMPT, height=args.psnr_size, width=args.psnr_size, num_inference_steps=args.psnr_steps,
                  guidance_scale=7.5, seed=0, scheduler="euler", output_type="np").images for p in (pipe, cpu))
        value, bound = psnr(a, b), IMAGE_TOLERANCES["fp16"].psnr
        levels = np.abs(np.round(np.clip(a, 0, 1) * 255) - np.round(np.clip(b, 0, 1) * 255))
        rec.put("psnr", {"side_px": args.psnr_size, "steps": args.psnr_steps, "psnr_db": value,
                         "identical": value is None, "max_8bit_diff": int(levels.max()), "bound_db": bound,
                         "passed": value is None or value >= bound})

    for side in args.sizes:
        rec.attempt(f"runtime unet {side} px", lambda s=side: steps(s))
    rec.attempt("runtime end to end", end_to_end)
    first, *beyond = args.finite_sizes
    rec.attempt(f"finite {first} px", lambda: finite(first))
    rec.attempt("provider vs CPU provider", against_cpu, needs_s=60)
    for side in beyond:
        rec.attempt(f"finite {side} px", lambda s=side: finite(s), needs_s=30 * (side / first) ** 2)


def phase_torch(args: argparse.Namespace, work: Path, rec: Phase) -> None:
    import diffusers
    import torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    from linfusion import load_pipeline

    gpu = not args.dry_run
    device, dtype = ("cuda", torch.float16) if gpu else ("cpu", torch.float32)  # CPU fp16 kernels are slow
    rec.put("torch", {"version": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
                      "cudnn": torch.backends.cudnn.version() if gpu else None,
                      "device": torch.cuda.get_device_name() if gpu else "cpu", "dtype": str(dtype)})
    poller = make_poller(args.dry_run, args.idle_mib)
    rec.put("memory_source", poller.source)
    pipe = load_pipeline(str(work / "diffusers"), linfusion=str(work / "linfusion"), dtype=dtype,
                         local_files_only=True).pipeline
    sdpa = UNet2DConditionModel.from_pretrained(str(work / "diffusers"), subfolder="unet", torch_dtype=dtype)
    rec.put("sdpa_processor", type(next(m for n, m in sdpa.named_modules() if n.endswith("attn1")).processor).__name__)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    channels, context = sdpa.config.in_channels, sdpa.config.cross_attention_dim

    def call(module: Any, feed: dict[str, np.ndarray]) -> Callable[[], Any]:
        from linfusion.runtime.contract import UNetIO as IO

        inputs = [torch.from_numpy(feed[k]).to(device) for k in (IO.sample, IO.timestep, IO.encoder_hidden_states)]
        inputs[0], inputs[2] = inputs[0].to(dtype), inputs[2].to(dtype)

        def run() -> Any:
            with torch.inference_mode():
                out = module(*inputs, return_dict=False)[0]
            sync()
            return out
        return run

    def reset() -> None:
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        poller.mark()

    def mib() -> dict[str, Any]:
        out = {"device_mib": poller.peak()}
        if gpu:
            out.update(allocated_mib=torch.cuda.max_memory_allocated() / 2**20,
                       reserved_mib=torch.cuda.max_memory_reserved() / 2**20)
        return out

    def steps(engine: str, module: Any, side: int) -> None:
        run = call(module, unet_feed(args.batch, side // 8, channels, context))
        reset()
        row, out = timed(run, args.warmup, args.repeats)
        if engine == "linfusion_eager":  # the runtime's output at this size is compared with it
            np.save(work / f"step_linfusion_eager_{side}.npy", out.float().cpu().numpy())
        rec.add("unet_step", {"engine": engine, "side_px": side, "batch": args.batch, **row, **mib()})
        print(f"{engine} {side} px: {row['seconds']:.4f} s/step", flush=True)

    def finite(side: int) -> None:
        reset()
        out = call(pipe.unet, unet_feed(1, side // 8, channels, context, seed=1))().float().cpu().numpy()
        np.save(work / f"finite_linfusion_eager_{side}.npy", out)
        rec.add("finite", {"side_px": side, "engine": "linfusion_eager", **finite_summary(out), **mib()})

    for engine, module in (("linfusion_eager", pipe.unet), ("sdpa", sdpa)):
        module.to(device)  # one UNet on the device at a time: its rows' memory is its own
        for side in args.sizes:
            rec.attempt(f"{engine} unet {side} px", lambda e=engine, m=module, s=side: steps(e, m, s))
        if engine == "linfusion_eager":  # reference outputs at the sizes the runtime reached
            for side in [s for s in args.finite_sizes if (work / f"finite_runtime_{s}.npy").exists()]:
                rec.attempt(f"eager finite {side} px", lambda s=side: finite(s), needs_s=10)
        module.to("cpu")

    def end_to_end() -> None:
        pipe.to(device)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe.vae.disable_tiling()
        reset()
        runs = []
        for _ in range(1 + args.e2e_repeats):
            start = time.perf_counter()
            with torch.inference_mode():
                pipe(PROMPT, height=args.e2e_size, width=args.e2e_size, num_inference_steps=args.steps,
                     guidance_scale=7.5, generator=torch.Generator().manual_seed(0), output_type="np")
            sync()
            runs.append(time.perf_counter() - start)
        rec.put("end_to_end", {"side_px": args.e2e_size, "steps": args.steps, "total": statistics.median(runs[1:]),
                               "runs": runs, **mib()})

    rec.attempt("diffusers end to end", end_to_end, needs_s=15)


PHASES = {"export": phase_export, "ort": phase_ort, "torch": phase_torch}


def run_phase(name: str, work: Path) -> int:
    args = argparse.Namespace(**json.loads((work / "config.json").read_text()))
    rec = Phase(work, name, args.deadline_at - (args.torch_reserve if name != "torch" else 0))
    rec.put("import", use_checkout())
    start = time.perf_counter()
    try:
        PHASES[name](args, work, rec)
    except Exception as exc:
        rec.add("errors", f"{name}: {type(exc).__name__}: {exc}")
        raise
    finally:
        rec.put("wall_s", time.perf_counter() - start)
    return 0


# --- the parent: machine facts, the phases, the report -------------------------------------------------

def smi(*query: str) -> list[str] | None:
    try:
        done = subprocess.run(["nvidia-smi", "-i", "0", f"--query-gpu={','.join(query)}",
                               "--format=csv,noheader,nounits"], check=False, capture_output=True, text=True)
        return [v.strip() for v in done.stdout.splitlines()[0].split(",")] if done.returncode == 0 else None
    except (OSError, IndexError):
        return None


def gpu_facts() -> dict[str, Any]:
    values = smi("name", "driver_version", "memory.total")
    if values is None:
        return {"name": "none: nvidia-smi did not answer"}
    header = subprocess.run(["nvidia-smi"], check=False, capture_output=True, text=True).stdout
    cuda = header.split("CUDA Version:")[1].split()[0] if "CUDA Version:" in header else None
    return {"name": values[0], "driver": values[1], "memory_total_mib": float(values[2]), "driver_cuda": cuda}


def assemble(base: dict[str, Any], work: Path) -> dict[str, Any]:
    """The record so far: ``base`` (machine, config, return codes) and the phases' files in ``work``."""
    r = json.loads(json.dumps(base))
    ph = {n: json.loads((work / f"phase_{n}.json").read_text()) for n in PHASES if (work / f"phase_{n}.json").exists()}
    ort, tor = ph.get("ort", {}), ph.get("torch", {})
    keep = ("wall_s", "seconds", "build_s", "import", "load", "skipped")
    r["phases"] = {n: {k: v for k, v in p.items() if k in keep} for n, p in ph.items()}
    r["errors"] += [e for p in ph.values() for e in p.get("errors", [])]
    r["machine"].update(onnxruntime=ort.get("onnxruntime"), torch=tor.get("torch"))
    if ort.get("onnxruntime"):  # the module that ran, not the CPU distribution's metadata
        r["machine"]["packages"]["onnxruntime"] = ort["onnxruntime"]["version"]
    r.update(runtime=ort.get("runtime"), sdpa_processor=tor.get("sdpa_processor"), psnr=ort.get("psnr"),
             memory_source={"runtime": ort.get("memory_source"), "torch": tor.get("memory_source")},
             unet_step=ort.get("unet_step", []) + tor.get("unet_step", []), ratios=[], finite=[],
             end_to_end={"runtime": ort.get("end_to_end"), "diffusers_linfusion": tor.get("end_to_end")},
             finite_linfusion_eager=tor.get("finite", []))
    for side in r["config"]["sizes"]:
        by = {x["engine"]: x["seconds"] for x in r["unet_step"] if x["side_px"] == side}
        if "runtime" in by:
            eager, sdpa = by.get("linfusion_eager"), by.get("sdpa")
            files = [work / f"step_{e}_{side}.npy" for e in ("runtime", "linfusion_eager")]
            r["ratios"].append({"side_px": side, "eager_over_runtime": eager and eager / by["runtime"],
                                "sdpa_over_runtime": sdpa and sdpa / by["runtime"],
                                "target_met": None if eager is None or side < 1024 else eager >= by["runtime"],
                                "runtime_vs_eager": rel_error(*map(np.load, files)) if all(map(Path.exists, files))
                                else None})
    met = [x["target_met"] for x in r["ratios"] if x["target_met"] is not None]
    r["target_runtime_at_least_eager_from_1024px"] = all(met) if met else None
    for row in ort.get("finite", []):
        ref = work / f"finite_linfusion_eager_{row['side_px']}.npy"
        if ref.exists():
            row["vs_linfusion_eager"] = rel_error(np.load(work / f"finite_runtime_{row['side_px']}.npy"), np.load(ref))
        r["finite"].append(row)
    return clean(r)


def markdown(r: dict[str, Any]) -> str:
    from harness import markdown_table

    m, g, c = r["machine"], r["machine"]["gpu"], r["config"]
    o, t = m.get("onnxruntime") or {}, m.get("torch") or {}
    text = [f"### gpu_ort ({r['date'][:10]}){', DRY RUN: CPU, tiny-sd, plumbing only' if r['dry_run'] else ''}",
            f"Command: `{r['command']}`",
            (f"Machine: {g.get('name')} ({g.get('memory_total_mib')} MiB, driver {g.get('driver')}, CUDA "
             f"{g.get('driver_cuda')}), {m['cpu']}, {m['cores']} cores, Python {m['python']}; torch {t.get('version')} "
             f"(CUDA {t.get('cuda')}, cuDNN {t.get('cudnn')}), diffusers {t.get('diffusers')}; onnxruntime "
             f"{o.get('version')} (CUDA {o.get('cuda_version') or '-'}); runtime options "
             f"{(r.get('runtime') or {}).get('passed')}; {c['variant']} fp16, random weights.")]
    cell = {(x["engine"], x["side_px"]): x for x in r["unet_step"]}
    ratio = {x["side_px"]: x for x in r["ratios"]}
    text.append(markdown_table(
        ["px", "batch", *(f"{v} s/step" for v in ENGINES.values()), "eager / runtime", "SDPA / runtime",
         *(f"{v} MiB" for v in ENGINES.values()), "eager allocated MiB", "runtime vs eager max rel err"],
        [[s, c["batch"], *(cell.get((e, s), {}).get("seconds") for e in ENGINES),
          *(ratio.get(s, {}).get(k) for k in ("eager_over_runtime", "sdpa_over_runtime")),
          *(cell.get((e, s), {}).get("device_mib") for e in ENGINES),
          cell.get(("linfusion_eager", s), {}).get("allocated_mib"),
          (ratio.get(s, {}).get("runtime_vs_eager") or {}).get("max_rel_error")] for s in c["sizes"]]))
    keys = ("side_px", "steps", "total", "encode", "denoise", "decode", "outside_unet_ms_per_step",
            "outside_unet_share_pct", "device_mib")
    text.append(markdown_table(
        ["end to end", "px", "steps", "total s", "encode s", "denoise s", "decode s", "outside UNet ms/step",
         "outside share %", "device MiB"],
        [[name, *((r["end_to_end"][k] or {}).get(key) for key in keys)]
         for name, k in (("runtime", "runtime"), ("diffusers + LinFusion", "diffusers_linfusion"))]))
    text.append(markdown_table(
        ["fp16, batch 1", "finite", "max abs", "std", "max rel err vs eager", "cosine", "device MiB"],
        [[f"{f['side_px']} px", f["finite"], f["max_abs"], f["std"], *(f.get("vs_linfusion_eager", {}).get(k)
          for k in ("max_rel_error", "cosine")), f.get("device_mib")] for f in r["finite"]]))
    text.append(f"UNet s/step: median of {c['repeats']} after {c['warmup']} warm-up calls, inputs and outputs in "
                f"host memory (the runner's API); end to end: Euler, CFG 7.5 batched, median of {c['e2e_repeats']} "
                f"after a warm-up. Memory: runtime {r['memory_source']['runtime']}; PyTorch "
                f"{r['memory_source']['torch']}, plus torch.cuda.max_memory_allocated.")
    if r.get("psnr"):
        p = r["psnr"]
        value = "identical" if p["identical"] else f"{p['psnr_db']:.1f} dB"
        text.append(f"Whole image, {c['providers'][0]} vs CPU provider, {p['side_px']} px, {p['steps']} steps: PSNR "
                    f"{value} (bound {p['bound_db']} dB: {'pass' if p['passed'] else 'FAIL'}), max 8-bit difference "
                    f"{p['max_8bit_diff']}.")
    text += [f"Errors: {'; '.join(r['errors'])}"] * bool(r["errors"])
    return "\n\n".join(text) + "\n"


def write_report(base: dict[str, Any], work: Path, out: Path) -> dict[str, Any]:
    """OUT/gpu_ort.json and .md from what the phases wrote so far (called after every phase)."""
    record = {**assemble(base, work), "wall_s": time.time() - base["started"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_ort.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "gpu_ort.md").write_text(markdown(record))
    return record


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny-sd, tiny sizes: checks the plumbing")
    p.add_argument("--variant", default="sd15", choices=("sd15", "sd15-small", "tiny"))
    p.add_argument("--sizes", default="512,1024,2048", help="UNet step sizes in px, at --batch")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="end-to-end steps")
    p.add_argument("--e2e-size", type=int, default=1024)
    p.add_argument("--e2e-repeats", type=int, default=3)
    p.add_argument("--finite-sizes", default="4096,8192", help="fp16 finiteness, batch 1; past the first if time")
    p.add_argument("--psnr-size", type=int, default=256)
    p.add_argument("--psnr-steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--providers", default="CUDAExecutionProvider,CPUExecutionProvider")
    p.add_argument("--provider-options", help="JSON for from_export(provider_options=...), where the API has it")
    p.add_argument("--io-binding", choices=("default", "on", "off"), default="default")
    p.add_argument("--skip-export", metavar="DIR", help="reuse DIR, the work folder of an earlier run")
    p.add_argument("--skip-parity", action="store_true", help="export without the parity check")
    p.add_argument("--phases", default="ort,torch", help="after the export")
    p.add_argument("--work", help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--deadline", type=float, default=480, help="seconds for the whole run")
    p.add_argument("--torch-reserve", type=float, default=100, help="seconds of --deadline kept for the torch phase")
    p.add_argument("--phase", choices=tuple(PHASES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        for key, value in DRY.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
        args.skip_parity = True
    args.providers = args.providers.split(",")
    args.sizes, args.finite_sizes = (sorted(int(s) for s in v.split(",")) for v in (args.sizes, args.finite_sizes))
    multiple = 32 if args.variant == "tiny" else 64
    if any(s % multiple for s in args.sizes + args.finite_sizes + [args.e2e_size, args.psnr_size]):
        p.error(f"every size must be a multiple of {multiple} px for {args.variant}")
    if min(args.repeats, args.e2e_repeats, args.steps) < 1:
        p.error("--repeats, --e2e-repeats and --steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.phase:
        return run_phase(args.phase, Path(args.work))
    import harness

    start = time.time()
    work = Path(args.skip_export or args.work or tempfile.mkdtemp(prefix="gpu_ort-"))
    work.mkdir(parents=True, exist_ok=True)
    phases = [n for n in args.phases.split(",") if n in PHASES and n != "export"]
    if args.skip_export:
        marker = work / "gpu_ort_export.json"
        if not marker.exists() or json.loads(marker.read_text())["variant"] != args.variant:
            print(f"gpu_ort: {work} holds no finished {args.variant} export; run without --skip-export")
            return 2
    else:
        phases.insert(0, "export")
    for stale in [*work.glob("phase_*.json"), *work.glob("finite_*.npy"), *work.glob("step_*.npy")]:
        stale.unlink()
    idle = None if args.dry_run else smi("memory.used")
    args.idle_mib, args.deadline_at = float(idle[0]) if idle else 0.0, start + args.deadline
    args.torch_reserve = args.torch_reserve if "torch" in phases else 0.0
    (work / "config.json").write_text(json.dumps(vars(args)))
    base: dict[str, Any] = {
        "study": "gpu_ort", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "started": start,
        "command": harness.command_line(), "dry_run": args.dry_run, "work": str(work),
        "machine": {**harness.machine(), "gpu": {"name": "none (dry run)"} if args.dry_run else gpu_facts(),
                    "idle_mib": args.idle_mib},
        "config": {k: v for k, v in vars(args).items() if k not in ("phase", "work", "out", "deadline_at")},
        "errors": [], "returncodes": {}}
    for name in phases:
        end = args.deadline_at - (args.torch_reserve if name != "torch" else 0)
        budget = max(end - time.time(), 30) + 20  # the child skips optional items past `end` itself
        print(f"== phase {name} (at most {budget:.0f} s)", flush=True)
        try:
            code: Any = subprocess.run([sys.executable, "-u", str(Path(__file__).resolve()), "--phase", name,
                                        "--work", str(work)], check=False, timeout=budget, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            code = "killed at its time limit"
        base["returncodes"][name] = code
        if code != 0:
            base["errors"].append(f"phase {name} ended with {code}")
        write_report(base, work, Path(args.out))
        if code != 0 and name == "export":
            break
    record = write_report(base, work, Path(args.out))
    print(markdown(record))
    if not (args.work or args.skip_export):
        shutil.rmtree(work, ignore_errors=True)
    return 1 if record["errors"] else 0

if __name__ == "__main__":
    sys.exit(main())
