"""GPU check of the linear-attention kernels, launched exactly as the TensorRT AOT plugins do.

    python benchmarks/gpu_check.py            # on a GPU with CuPy (and torch for the comparisons)
    python benchmarks/gpu_check.py --dry-run  # anywhere with nvcc: compile and check plumbing

Same PTX (NVRTC through cuda-python when present, else ``nvcc --ptx``), same kernel names, same
argument order (inputs, extra int32 scalars, outputs), same grids and blocks (all from
``engines/kernel_build.py``). Outputs are poisoned (NaN) before every launch.

Correctness: N in {64, 4096, 65536, 262144 + 77}, head dims 40/64/80/160, batch 1 and 2,
fp32/fp16/bf16, every kernel tactic the plugins offer (CUDA-core; tensor-core for fp16/bf16
on sm_80+, and tensor-core-wide where its apply tiling differs, e.g. d = 160), against float64 numpy (fp32 and fp16 share inputs on the fp16 grid, so two
references serve three dtypes); error = max |out - ref| / max |ref|; bounds 1e-5
(fp32), 2e-3 (fp16), 1.6e-2 (bf16). Large N use 2 heads to keep the numpy reference fast.

Speed (fp16, batch 2, each tactic): time of state+reduce+apply, achieved bandwidth (q, k, v read once and out
written once) against the measured device-to-device copy bandwidth, and against an unfused
PyTorch implementation and torch SDPA (flash) at the same N. Prints a short table. < 5 min on
an H100. Imports nothing from the linfusion package, so it runs from a bare checkout.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _kernels():
    spec = importlib.util.spec_from_file_location("linfusion_kernels", ROOT / "engines" / "kernel_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


K = _kernels()
NS = (64, 4096, 65536, 262144 + 77)
HEAD_DIMS = K.STANDARD_HEAD_DIMS
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
EPS = 1e-4


def reference(q, k, v, heads, eps=EPS):
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b, n, c = q.shape
    d = c // heads

    def split(x):
        return x.reshape(b, n, heads, d).transpose(0, 2, 1, 3)

    def phi(x):
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))

    pq, pk = phi(split(q)), phi(split(k))
    kv = pk.transpose(0, 1, 3, 2) @ split(v) / n
    out = (pq @ kv) / (pq @ pk.mean(axis=2)[..., None] + eps)
    return out.transpose(0, 2, 1, 3).reshape(b, n, c)


def build_ptx(arch: str) -> bytes:
    source = K.kernel_source(K.all_variants())
    try:
        return K.compile_ptx(source, "compute_" + arch.split("_")[1])
    except K.KernelCompileError as exc:
        if "unavailable" not in str(exc):
            raise
        return K.nvcc_compile(source, arch, "ptx")[0]


def ptx_params(ptx: bytes, name: str) -> list[str]:
    text = ptx.decode()
    m = re.search(r"\.entry\s+" + name + r"\s*\((.*?)\)", text, re.DOTALL)
    if not m:
        raise SystemExit(f"{name} is not in the PTX")
    return re.findall(r"\.param\s+\.(\w+)", m.group(1))


# The plugins' argument lists: (kind, value) with kind "ptr" or "i32".
def state_args(k, v, n, heads, partials):
    return [("ptr", k), ("ptr", v), ("i32", n), ("i32", heads), ("ptr", partials)]


def reduce_args(partials, splits, elements, state):
    return [("ptr", partials), ("i32", splits), ("i32", elements), ("ptr", state)]


def apply_args(q, state, n, heads, eps, out):
    return [("ptr", q), ("ptr", state), ("i32", n), ("i32", heads), ("i32", K.eps_bits(eps)), ("ptr", out)]


def check_plumbing(ptx: bytes, arch: str) -> None:
    """Every entry's PTX parameter list matches the argument list the plugin passes."""
    want = {"ptr": "u64", "i32": ("u32", "s32", "b32")}

    def same(name, args):
        params = ptx_params(ptx, name)
        kinds = [kind for kind, _ in args]
        ok = len(params) == len(kinds) and all(p == want["ptr"] if k == "ptr" else p in want["i32"]
                                               for p, k in zip(params, kinds))
        if not ok:
            raise SystemExit(f"argument mismatch for {name}: PTX {params}, plugin {kinds}")

    same(K.REDUCE_KERNEL, reduce_args(0, 1, 1, 0))
    for dtype, d in K.all_variants():
        for tactic in K.tactics(dtype, arch, d):
            same(K.state_kernel(dtype, d, tactic), state_args(0, 0, 1, 1, 0))
            same(K.apply_kernel(dtype, d, tactic), apply_args(0, 0, 1, 1, EPS, 0))


class Launcher:
    """CuPy RawModule over the PTX; launches state -> reduce -> apply like the plugins."""

    def __init__(self, ptx: bytes) -> None:
        import cupy as cp

        self.cp = cp
        self.tmp = tempfile.NamedTemporaryFile(suffix=".ptx", delete=False)
        self.tmp.write(ptx)
        self.tmp.close()
        self.module = cp.RawModule(path=self.tmp.name)
        self.functions = {}

    def fn(self, name):
        if name not in self.functions:
            self.functions[name] = self.module.get_function(name)
        return self.functions[name]

    def launch(self, name, launch: K.Launch, args) -> None:
        values = tuple(np.int32(v) if kind == "i32" else v for kind, v in args)
        self.fn(name)(tuple(int(g) for g in launch.grid), tuple(launch.block), values, shared_mem=launch.shared_mem)

    def run(self, q, k, v, heads, dtype, eps=EPS, poison=True, tactic=K.CUDA_CORE):
        cp = self.cp
        b, n, c = q.shape
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
        self.launch(K.state_kernel(dtype, d, tactic), K.state_launch(s, b, heads, t, tactic=tactic),
                    state_args(k, v, n, heads, partials))
        self.launch(K.REDUCE_KERNEL, K.reduce_launch(b, heads, t.state_elements),
                    reduce_args(partials, s, t.state_elements, state))
        self.launch(K.apply_kernel(dtype, d, tactic), K.apply_launch(n, b, heads, t, tactic=tactic),
                    apply_args(q, state, n, heads, eps, out))
        return out


def np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


GRID_OF = {"float32": "float16", "float16": "float16", "bfloat16": "bfloat16"}
"""The values each dtype is checked on: fp32 shares fp16's grid (fp32 holds fp16 values exactly),
so two float64 references serve three dtypes; the numpy reference is the slowest part."""


def on_grid(x: np.ndarray, grid: str) -> np.ndarray:
    """float32 copies of x rounded to fp16 or bf16 values (clipped to 57344, exact in both)."""
    return np.clip(x, -57344.0, 57344.0).astype(np_dtype(grid)).astype(np.float32)


def correctness(launcher, rows, arch: str, dtypes=("float32", "float16", "bfloat16")) -> bool:
    cp = launcher.cp
    ok = True
    rng = np.random.default_rng(0)
    for n in NS:
        for d in HEAD_DIMS:
            heads = 8 if n <= 4096 else 2
            for batch in (1, 2):
                sample = [rng.standard_normal((batch, n, heads * d)) for _ in range(3)]
                refs = {}
                for dtype in dtypes:
                    grid = GRID_OF[dtype]
                    host = [on_grid(x, grid) for x in sample]
                    if grid not in refs:
                        refs[grid] = reference(*host, heads)
                    ref = refs[grid]
                    typed = [x.astype(np_dtype(dtype)) for x in host]
                    assert all(np.array_equal(t.astype(np.float32), x) for t, x in zip(typed, host))
                    dev = [cp.asarray(x.view(np.uint16)).view(cp.uint16) if dtype == "bfloat16" else cp.asarray(x)
                           for x in typed]
                    for tactic in K.tactics(dtype, arch, d):
                        out = launcher.run(*dev, heads, dtype, tactic=tactic)
                        got = cp.asnumpy(out)
                        got = (got.view(np_dtype(dtype)) if dtype == "bfloat16" else got).astype(np.float64)
                        err = float(np.abs(got - ref).max() / np.abs(ref).max()) if np.isfinite(got).all() else float("inf")
                        passed = err <= TOL[dtype]
                        ok &= passed
                        rows.append((f"N={n} d={d} B={batch} H={heads} {dtype} {K.TACTIC_NAMES[tactic]}",
                                     f"{err:.2e}", "ok" if passed else "FAIL"))
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
    seconds = timed(cp, lambda: dst.__setitem__(Ellipsis, src), 10)
    return 2 * src.nbytes / seconds


def speed(launcher, rows, arch: str) -> None:
    cp = launcher.cp
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        torch = None
    bandwidth = copy_bandwidth(cp)
    rows.append(("device copy bandwidth", f"{bandwidth / 1e9:.0f} GB/s", ""))
    heads_for = {40: 8, 64: 10, 80: 8, 160: 8}
    for d in HEAD_DIMS:
        heads, batch = heads_for[d], 2
        for n in (4096, 16384, 65536, 262144):
            q, k, v = (cp.random.standard_normal((batch, n, heads * d), dtype=cp.float32).astype(cp.float16)
                       for _ in range(3))
            iters = max(3, min(50, int(2e9 // q.nbytes)))
            per_tactic = {}
            for tactic in K.tactics("float16", arch, d):
                per_tactic[tactic] = timed(
                    cp, lambda tc=tactic: launcher.run(q, k, v, heads, "float16", poison=False, tactic=tc), iters)
            best = min(per_tactic, key=per_tactic.get)  # what TensorRT's tactic timing would pick
            t_fused = per_tactic[best]
            achieved = 4 * q.nbytes / t_fused
            line = [f"{t_fused * 1e3:.3f} ms {K.TACTIC_NAMES[best]}",
                    f"{achieved / 1e9:.0f} GB/s ({100 * achieved / bandwidth:.0f}% copy)"]
            line += [f"{K.TACTIC_NAMES[tc]} {t * 1e3:.3f} ms ({100 * 4 * q.nbytes / t / bandwidth:.0f}% copy)"
                     for tc, t in per_tactic.items() if tc != best]
            if torch is not None:
                tq, tk, tv = (torch.as_tensor(x, device="cuda") for x in (q, k, v))

                def unfused():
                    b_, n_, c_ = tq.shape

                    def split(x):
                        return x.float().reshape(b_, n_, heads, d).transpose(1, 2)

                    pq, pk = F.elu(split(tq)) + 1.0, F.elu(split(tk)) + 1.0
                    z = pq @ pk.mean(dim=-2, keepdim=True).transpose(-2, -1) + EPS
                    kv = (pk.transpose(-2, -1) * n_**-0.5) @ (split(tv) * n_**-0.5)
                    return (pq @ kv / z).transpose(1, 2).reshape(b_, n_, c_).half()

                t_unfused = timed_torch(torch, unfused, max(3, iters // 2))
                line.append(f"unfused torch {t_unfused * 1e3:.3f} ms ({t_unfused / t_fused:.1f}x)")
                if n <= 65536:
                    sq, sk, sv = (x.reshape(batch, n, heads, d).transpose(1, 2) for x in (tq, tk, tv))
                    t_sdpa = timed_torch(torch, lambda: F.scaled_dot_product_attention(sq, sk, sv), 3)
                    line.append(f"SDPA {t_sdpa * 1e3:.2f} ms ({t_sdpa / t_fused:.0f}x)")
                else:
                    line.append("SDPA skipped (quadratic)")
            rows.append((f"speed fp16 B=2 H={heads} d={d} N={n}", line[0], "; ".join(line[1:])))


def timed_torch(torch, fn, iters):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def print_table(rows) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="compile with nvcc and check argument plumbing only")
    p.add_argument("--arch", default=None, help="sm_XX (default: the device's, or sm_90 for --dry-run)")
    p.add_argument("--skip-speed", action="store_true")
    args = p.parse_args(argv)
    if args.dry_run:
        arch = args.arch or "sm_90"
        ptx, _ = K.nvcc_compile(K.kernel_source(K.all_variants()), arch, "ptx")
        check_plumbing(ptx, arch)
        print(f"dry run ok: {len(K.ptx_entries(ptx))} kernels compiled for {arch}, argument lists match the plugins")
        return 0
    import cupy as cp

    arch = args.arch or f"sm_{cp.cuda.Device().compute_capability}"
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    ptx = build_ptx(arch)
    check_plumbing(ptx, arch)
    launcher = Launcher(ptx)
    rows = [("case", "result", "")]
    started = time.time()
    ok = correctness(launcher, rows, arch)
    if not args.skip_speed:
        speed(launcher, rows, arch)
    print(f"device: {name} ({arch}); {time.time() - started:.0f}s")
    print_table(rows)
    print("ALL CORRECTNESS CHECKS PASSED" if ok else "CORRECTNESS FAILURES: see FAIL rows")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
