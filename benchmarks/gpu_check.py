"""GPU check of the linear-attention kernels, launched exactly as the TensorRT AOT plugins do.

    python benchmarks/gpu_check.py --json out.json      # GPU + CuPy (+ torch for the comparisons)
    python benchmarks/gpu_check.py --speed-only --dims 64 --tokens 65536
    python benchmarks/gpu_check.py --dry-run --json plan.json   # nvcc only: compile, plumbing, the plan

Same PTX (NVRTC, else ``nvcc --ptx``), names, argument order and grids as the plugins (all from
``engines/kernel_build.py``); imports nothing from the linfusion package. Correctness: N in {64,
4096, 65536, 262221}, d in {40, 64, 80, 160}, batch 1 and 2, fp32/fp16/bf16, every tactic, NaN-poisoned
outputs, against a float64 reference (CuPy on the GPU, chunked over tokens; --reference numpy);
error = max |out - ref| / max |ref| <= 1e-5 / 2e-3 / 1.6e-2 (fp32 / fp16 / bf16). Speed (fp16, B=2):
each kernel and state+reduce+apply per tactic, bandwidth (q, k, v, out once) vs device copy,
unfused PyTorch, SDPA. Rows print as produced; --json is rewritten after every row; exit status 1
when a case fails. Experiment knobs (the shipped source is unchanged): --apply-rows,
--state-blocks, --min-blocks KIND=N (benchmarks/kernel_registers.py); --profile for Nsight Compute.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


K = _load("linfusion_kernels", ROOT / "engines" / "kernel_build.py")
CHECK_TOKENS = (64, 4096, 65536, 262144 + 77)
SPEED_TOKENS = (4096, 16384, 65536, 262144)
SPEED_HEADS = {40: 8, 64: 10, 80: 8, 160: 8}
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
GRID_OF = {"float32": "float16", "float16": "float16", "bfloat16": "bfloat16"}
EPS = 1e-4


# --- float64 reference and input grids: one code path over an array module xp (numpy or cupy) ----

def phi(x, xp=np):
    return xp.where(x > 0, x + 1.0, xp.exp(xp.minimum(x, 0.0)))


def reference(q, k, v, heads, eps=EPS, xp=np, chunk=1 << 16):
    """float64 LinFusion attention on [B, N, H*d]: kv and the phi(k) sum accumulated over token
    chunks, then the output chunk by chunk (peak memory O(chunk), not O(N), beyond the result)."""
    b, n, c = q.shape
    d = c // heads

    def part(x, lo, hi):  # tokens [lo, hi) as float64 [B, H, T, d]
        return xp.asarray(x[:, lo:hi], dtype=xp.float64).reshape(b, hi - lo, heads, d).transpose(0, 2, 1, 3)

    kv, ksum = xp.zeros((b, heads, d, d)), xp.zeros((b, heads, d, 1))
    for lo in range(0, n, chunk):
        pk = phi(part(k, lo, min(n, lo + chunk)), xp)
        kv += pk.transpose(0, 1, 3, 2) @ part(v, lo, min(n, lo + chunk))
        ksum += pk.sum(axis=2)[..., None]
    kv, mean = kv / n, ksum / n
    out = xp.empty((b, n, c))
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        pq = phi(part(q, lo, hi), xp)
        out[:, lo:hi] = ((pq @ kv) / (pq @ mean + eps)).transpose(0, 2, 1, 3).reshape(b, hi - lo, c)
    return out


def bf16_bits(x, xp=np):
    """float32 -> bfloat16 bits (uint16), round to nearest even (no NaN in the inputs)."""
    u = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    return ((u + xp.uint32(0x7FFF) + ((u >> 16) & xp.uint32(1))) >> 16).astype(xp.uint16)


def from_bf16_bits(bits, xp=np):
    return (bits.astype(xp.uint32) << 16).view(xp.float32)


def on_grid(x, grid: str, xp=np):
    """float32 copies of x rounded to fp16 or bf16 values (clipped to 57344, exact in both)."""
    x = xp.clip(x.astype(xp.float32), -57344.0, 57344.0)
    return x.astype(xp.float16).astype(xp.float32) if grid == "float16" else from_bf16_bits(bf16_bits(x, xp), xp)


# --- cases ------------------------------------------------------------------------------------

def tactic_ids(dtype, arch, d, names=None):
    return [t for t in K.tactics(dtype, arch, d) if names is None or K.TACTIC_NAMES[t] in names]


def correctness_cases(arch, dims, tokens, dtypes, tactic_names=None):
    """(N, d, H, B, dtype, tactic), grouped so that one input sample serves consecutive cases."""
    return [(n, d, 8 if n <= 4096 else 2, b, dtype, t) for n in tokens for d in dims for b in (1, 2)
            for dtype in dtypes for t in tactic_ids(dtype, arch, d, tactic_names)]


def speed_cases(arch, dims, tokens, tactic_names=None):
    return [(n, d, SPEED_HEADS.get(d, 8), 2, ids) for d in dims for n in tokens
            if (ids := tactic_ids("float16", arch, d, tactic_names))]


# --- compilation and plumbing -------------------------------------------------------------------

def build_ptx(arch: str, variants, min_blocks=None, nvcc_only=False) -> bytes:
    source = K.kernel_source(variants)
    if min_blocks:
        source = _load("linfusion_kernel_registers", ROOT / "benchmarks" / "kernel_registers.py").with_min_blocks(
            source, min_blocks)
    if not nvcc_only:
        try:
            return K.compile_ptx(source, "compute_" + arch.split("_")[1])
        except K.KernelCompileError as exc:
            if "unavailable" not in str(exc):
                raise
    return K.nvcc_compile(source, arch, "ptx")[0]


# The plugins' argument lists: (kind, value) with kind "ptr" or "i32".
def state_args(k, v, n, heads, partials):
    return [("ptr", k), ("ptr", v), ("i32", n), ("i32", heads), ("ptr", partials)]


def reduce_args(partials, splits, elements, state):
    return [("ptr", partials), ("i32", splits), ("i32", elements), ("ptr", state)]


def apply_args(q, state, n, heads, eps, out):
    return [("ptr", q), ("ptr", state), ("i32", n), ("i32", heads), ("i32", K.eps_bits(eps)), ("ptr", out)]


def check_plumbing(ptx: bytes, arch: str, variants) -> None:
    """Every entry's PTX parameter list matches the argument list the plugin passes."""
    def same(name, args):
        if not (m := re.search(r"\.entry\s+" + name + r"\s*\((.*?)\)", ptx.decode(), re.DOTALL)):
            raise SystemExit(f"{name} is not in the PTX")
        params, kinds = re.findall(r"\.param\s+\.(\w+)", m.group(1)), [kind for kind, _ in args]
        if len(params) != len(kinds) or not all(p == "u64" if k == "ptr" else p in ("u32", "s32", "b32")
                                                for p, k in zip(params, kinds)):
            raise SystemExit(f"argument mismatch for {name}: PTX {params}, plugin {kinds}")

    same(K.REDUCE_KERNEL, reduce_args(0, 1, 1, 0))
    for dtype, d in variants:
        for tactic in K.tactics(dtype, arch, d):
            same(K.state_kernel(dtype, d, tactic), state_args(0, 0, 1, 1, 0))
            same(K.apply_kernel(dtype, d, tactic), apply_args(0, 0, 1, 1, EPS, 0))


class Launcher:
    """CuPy RawModule over the PTX; launches state -> reduce -> apply like the plugins."""

    def __init__(self, ptx: bytes) -> None:
        import cupy as cp

        self.cp = cp
        with tempfile.NamedTemporaryFile(suffix=".ptx", delete=False) as f:
            f.write(ptx)
        self.module = cp.RawModule(path=f.name)
        self.functions = {}

    def launch(self, name, launch, args) -> None:
        if name not in self.functions:
            self.functions[name] = self.module.get_function(name)
        self.functions[name](tuple(int(g) for g in launch.grid), tuple(launch.block),
                             tuple(np.int32(v) if kind == "i32" else v for kind, v in args),
                             shared_mem=launch.shared_mem)

    def kernels(self, q, k, v, heads, dtype, tactic, eps=EPS, poison=True):
        """([(kernel name, launch function)] for state, reduce, apply; the output array)."""
        cp, (b, n, c) = self.cp, q.shape
        d = c // heads
        t = K.tiling(d)
        s = K.num_splits(n, b, heads, t)
        partials = cp.empty((b, heads, s, d, d + 1), cp.float32)
        state = cp.empty((b, heads, d, d + 1), cp.float32)
        out = cp.empty(q.shape, q.dtype)
        if poison:
            partials.fill(np.nan)
            state.fill(np.nan)
            out.view(cp.uint16 if q.dtype.itemsize == 2 else cp.uint32).fill(  # all-ones: NaN in every dtype
                0xFFFF if q.dtype.itemsize == 2 else 0xFFFFFFFF)
        steps = [(K.state_kernel(dtype, d, tactic), K.state_launch(s, b, heads, t, tactic=tactic),
                  state_args(k, v, n, heads, partials)),
                 (K.REDUCE_KERNEL, K.reduce_launch(b, heads, t.state_elements),
                  reduce_args(partials, s, t.state_elements, state)),
                 (K.apply_kernel(dtype, d, tactic), K.apply_launch(n, b, heads, t, tactic=tactic),
                  apply_args(q, state, n, heads, eps, out))]
        return [(name, lambda a=(name, g, args): self.launch(*a)) for name, g, args in steps], out


# --- the two parts --------------------------------------------------------------------------------

def case_record(n, d, heads, batch, dtype, tactic, error, passed) -> dict:
    return {"N": n, "d": d, "H": heads, "B": batch, "dtype": dtype, "tactic": K.TACTIC_NAMES[tactic], "error": error,
            "bound": TOL[dtype], "pass": passed}


def speed_record(n, d, heads, batch, tactics) -> dict:
    """tactics: {name: {state_ms, reduce_ms, apply_ms, total_ms, gbs, copy_pct, kernels}}."""
    return {"N": n, "d": d, "H": heads, "B": batch, "dtype": "float16", "tactics": tactics, "best": None,
            "unfused_torch_ms": None, "sdpa_ms": None}


def correctness(launcher, cases, emit, xp) -> bool:
    """xp: the array module of the reference (cupy: on the GPU; numpy: on the host)."""
    cp, ok, refs, key = launcher.cp, True, {}, None
    for n, d, heads, batch, dtype, tactic in cases:
        if (n, d, batch) != key:  # a new sample; a per-shape seed keeps inputs independent of the filters
            key, refs = (n, d, batch), {}
            rs = xp.random.RandomState((n * 1009 + d * 17 + batch) % 2**31)
            sample = [rs.standard_normal((batch, n, heads * d)).astype(xp.float32) for _ in range(3)]
        grid = GRID_OF[dtype]
        if grid not in refs:  # fp32 inputs sit on the fp16 grid: two references serve three dtypes
            host = [on_grid(x, grid, xp) for x in sample]
            refs[grid] = (host, reference(*host, heads, xp=xp))
        host, ref = refs[grid]
        dev = [bf16_bits(x, cp) if dtype == "bfloat16" else x.astype(dtype) for x in map(cp.asarray, host)]
        steps, out = launcher.kernels(*dev, heads, dtype, tactic)
        [fn() for _, fn in steps]
        got = from_bf16_bits(out, cp) if dtype == "bfloat16" else out
        got = xp.asarray(got.astype(cp.float64)) if xp is cp else cp.asnumpy(got).astype(np.float64)
        finite = bool(xp.isfinite(got).all())
        err = float(xp.abs(got - ref).max() / xp.abs(ref).max()) if finite else None
        passed = finite and err <= TOL[dtype]
        ok &= passed
        emit("correctness", case_record(n, d, heads, batch, dtype, tactic, err, passed),
             f"N={n} d={d} H={heads} B={batch} {dtype} {K.TACTIC_NAMES[tactic]}: "
             f"{'non-finite' if err is None else f'{err:.2e}'} <= {TOL[dtype]:g} {'ok' if passed else 'FAIL'}")
    return ok


def timed(cp, fn, iters):
    fn()
    cp.cuda.Device().synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / iters / 1e3


def copy_bandwidth(cp) -> float:
    src = cp.empty(1 << 30, cp.uint8)
    dst = cp.empty_like(src)
    return 2 * src.nbytes / timed(cp, lambda: dst.__setitem__(Ellipsis, src), 10)


def torch_times(torch, q, k, v, heads, iters):
    """(unfused PyTorch, SDPA) seconds for the same fp16 inputs; SDPA only up to N = 65536."""
    import torch.nn.functional as F

    tq, tk, tv = (torch.as_tensor(x, device="cuda") for x in (q, k, v))
    b, n, c = tq.shape
    d = c // heads

    def split(x):
        return x.reshape(b, n, heads, d).transpose(1, 2)

    def unfused():
        pq, pk = F.elu(split(tq).float()) + 1.0, F.elu(split(tk).float()) + 1.0
        z = pq @ pk.mean(dim=-2, keepdim=True).transpose(-2, -1) + EPS
        kv = (pk.transpose(-2, -1) * n**-0.5) @ (split(tv).float() * n**-0.5)
        return (pq @ kv / z).transpose(1, 2).reshape(b, n, c).half()

    def clock(fn, count):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(count):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / count

    sdpa = (clock(lambda: F.scaled_dot_product_attention(split(tq), split(tk), split(tv)), 3)
            if n <= 65536 else None)
    return clock(unfused, max(3, iters // 2)), sdpa


def speed(launcher, cases, emit, bandwidth, torch=None, profile=False) -> None:
    cp = launcher.cp
    for n, d, heads, batch, tactics in cases:
        q, k, v = (cp.random.standard_normal((batch, n, heads * d), dtype=cp.float32).astype(cp.float16)
                   for _ in range(3))
        moved, iters = 4 * q.nbytes, max(3, min(50, int(2e9 // q.nbytes)))
        row = speed_record(n, d, heads, batch, {})
        for tactic in tactics:
            steps, _ = launcher.kernels(q, k, v, heads, "float16", tactic, poison=False)
            if profile:  # one launch of each kernel and nothing else: what Nsight Compute should see
                [fn() for _, fn in steps]
                continue
            times = {f"{kind}_ms": 1e3 * timed(cp, fn, iters) for kind, (_, fn) in zip(("state", "reduce", "apply"), steps)}
            total = timed(cp, lambda s=steps: [fn() for _, fn in s], iters)
            row["tactics"][K.TACTIC_NAMES[tactic]] = {**times, "total_ms": 1e3 * total, "gbs": moved / total / 1e9,
                                                      "copy_pct": 100 * moved / total / bandwidth,
                                                      "kernels": [name for name, _ in steps]}
        if profile:
            cp.cuda.Device().synchronize()
            print(f"profiled N={n} d={d} H={heads} B={batch}: {', '.join(K.TACTIC_NAMES[t] for t in tactics)}")
            continue
        best = row["best"] = min(row["tactics"], key=lambda name: row["tactics"][name]["total_ms"])  # TensorRT's pick
        if torch is not None:
            unfused, sdpa = torch_times(torch, q, k, v, heads, iters)
            row["unfused_torch_ms"], row["sdpa_ms"] = 1e3 * unfused, None if sdpa is None else 1e3 * sdpa
        fast = row["tactics"][best]
        text = "; ".join(f"{name} {t['total_ms']:.3f} ms = {t['state_ms']:.3f}+{t['reduce_ms']:.3f}+{t['apply_ms']:.3f}"
                         f" ({t['copy_pct']:.0f}% copy)" for name, t in row["tactics"].items())
        vs = "".join(f"; {label} {row[key]:.3f} ms ({row[key] / fast['total_ms']:.1f}x)"
                     for label, key in (("unfused torch", "unfused_torch_ms"), ("SDPA", "sdpa_ms")) if row[key])
        emit("speed", row, f"speed fp16 N={n} d={d} H={heads} B={batch}: best {best} {fast['gbs']:.0f} GB/s; {text}{vs}")


# --- driver ------------------------------------------------------------------------------------------

def machine_info(cp, arch, torch) -> dict:
    def run(*cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return out.strip().split("\n")[0] or None

    info = {"gpu": None, "arch": arch, "sm_count": None, "driver": None, "cuda_driver_api": None, "cuda_runtime": None,
            "cupy": None, "torch": getattr(torch, "__version__", None), "host": platform.node(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": run("git", "rev-parse", "--short", "HEAD")}
    if cp is not None:
        props, rt = cp.cuda.runtime.getDeviceProperties(0), cp.cuda.runtime
        info.update(gpu=props["name"].decode(), sm_count=props["multiProcessorCount"], cupy=cp.__version__,
                    driver=run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
                    **{key: f"{v // 1000}.{v % 1000 // 10}" for key, v in
                       (("cuda_driver_api", rt.driverGetVersion()), ("cuda_runtime", rt.runtimeGetVersion()))})
    return info


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="nvcc compile, argument plumbing and the case plan only")
    p.add_argument("--arch", default=None, help="sm_XX (default: the device's, or sm_90 for --dry-run)")
    part = p.add_mutually_exclusive_group()
    part.add_argument("--speed-only", action="store_true")
    part.add_argument("--correctness-only", "--skip-speed", action="store_true")
    p.add_argument("--dims", type=ints, default=K.STANDARD_HEAD_DIMS, help="head dims, e.g. 40,64")
    p.add_argument("--tokens", type=ints, help="N values for both parts (default: correctness "
                   f"{','.join(map(str, CHECK_TOKENS))}; speed {','.join(map(str, SPEED_TOKENS))})")
    p.add_argument("--dtypes", default="float32,float16,bfloat16", help="correctness dtypes")
    p.add_argument("--tactics", help="only these tactics, e.g. tensor-core,tensor-core-wide")
    p.add_argument("--json", type=Path, help="write machine, every case and every speed row here")
    p.add_argument("--reference", choices=("auto", "numpy"), default="auto", help="auto: CuPy float64 on the GPU")
    p.add_argument("--no-torch", action="store_true", help="skip the unfused PyTorch and SDPA timings")
    p.add_argument("--profile", action="store_true", help="speed cases: one launch per kernel, no timing (for ncu)")
    p.add_argument("--apply-rows", type=int, help="experiment: tokens per tensor-core apply block (multiple of 128)")
    p.add_argument("--state-blocks", type=int, help="experiment: target state blocks (TARGET_STATE_BLOCKS)")
    p.add_argument("--min-blocks", action="append", default=[], metavar="KIND=N",
                   help="experiment: __launch_bounds__ min blocks of a kernel family (state_tc, apply_tc, ...)")
    args = p.parse_args(argv)
    args.dtypes = tuple(args.dtypes.split(","))
    args.tactics = None if args.tactics is None else tuple(args.tactics.split(","))
    if bad := (set(args.dtypes) - set(K.DTYPES)) | (set(args.tactics or ()) - set(K.TACTIC_NAMES.values())):
        p.error(f"unknown dtype or tactic {', '.join(sorted(bad))}")
    if args.apply_rows and args.apply_rows % 128:
        p.error("--apply-rows must be a multiple of 128 (the largest tokens per pass)")
    try:
        args.min_blocks = {k: int(v) for k, v in (item.split("=", 1) for item in args.min_blocks)}
    except ValueError:
        p.error("--min-blocks takes KIND=N, e.g. --min-blocks apply_tc=3")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.apply_rows:
        K.APPLY_ROWS = args.apply_rows
        K.tensor_core_tiling.cache_clear()
    if args.state_blocks:
        K.TARGET_STATE_BLOCKS = args.state_blocks
    cp = torch = None
    if not args.dry_run:
        try:
            import cupy as cp
        except ImportError:
            raise SystemExit("CuPy is not installed: pip install cupy-cuda13x (or cupy-cuda12x), or use --dry-run")
        if not (args.no_torch or args.profile or args.correctness_only):
            try:
                import torch
            except ImportError:
                torch = None
    arch = args.arch or (f"sm_{cp.cuda.Device().compute_capability}" if cp else "sm_90")
    checks = [] if args.speed_only else correctness_cases(arch, args.dims, args.tokens or CHECK_TOKENS,
                                                          args.dtypes, args.tactics)
    speeds = [] if args.correctness_only else speed_cases(arch, args.dims, args.tokens or SPEED_TOKENS, args.tactics)
    needed = {c[4] for c in checks} | ({"float16"} if speeds else set())  # compile only what runs
    variants = [(dtype, d) for dtype in K.DTYPES if dtype in needed for d in args.dims]
    result = {"schema": "linfusion-gpu-check/1", "dry_run": args.dry_run, "machine": machine_info(cp, arch, torch),
              "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
              "experiment": {"apply_rows": K.APPLY_ROWS, "target_state_blocks": K.TARGET_STATE_BLOCKS,
                             "min_blocks": args.min_blocks},
              "copy_bandwidth_gbs": None, "correctness": [], "speed": [], "ok": None, "seconds": None}
    started = time.time()

    def save():
        if args.json:
            result["seconds"] = round(time.time() - started, 1)
            tmp = args.json.with_name(args.json.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
            os.replace(tmp, args.json)

    def emit(part, record, line):
        result[part].append(record)
        print(line, flush=True)
        save()

    ptx = build_ptx(arch, variants, args.min_blocks, nvcc_only=args.dry_run)
    check_plumbing(ptx, arch, variants)
    print(f"{len(K.ptx_entries(ptx))} kernels compiled for {arch}, argument lists match the plugins; "
          f"{len(checks)} correctness cases, {len(speeds)} speed rows", flush=True)
    if args.dry_run:  # the plan, through the same records and writer
        for n, d, heads, batch, dtype, tactic in checks:
            emit("correctness", case_record(n, d, heads, batch, dtype, tactic, None, None),
                 f"planned N={n} d={d} H={heads} B={batch} {dtype} {K.TACTIC_NAMES[tactic]}")
        for n, d, heads, batch, tactics in speeds:
            emit("speed", speed_record(n, d, heads, batch, {K.TACTIC_NAMES[t]: None for t in tactics}),
                 f"planned speed fp16 N={n} d={d} H={heads} B={batch}")
        print(f"dry run ok for {arch}")
        return 0
    print(f"device: {result['machine']['gpu']} ({arch}), driver {result['machine']['driver']}", flush=True)
    launcher = Launcher(ptx)
    ok = correctness(launcher, checks, emit, np if args.reference == "numpy" else cp)
    if speeds:
        bandwidth = None if args.profile else copy_bandwidth(cp)
        result["copy_bandwidth_gbs"] = bandwidth and bandwidth / 1e9
        if bandwidth:
            print(f"device copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
        speed(launcher, speeds, emit, bandwidth, torch, args.profile)
    result["ok"] = ok
    save()
    print(f"{time.time() - started:.0f} s; " + ("ALL CORRECTNESS CHECKS PASSED" if ok else
                                                "CORRECTNESS FAILURES: see the FAIL rows"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
