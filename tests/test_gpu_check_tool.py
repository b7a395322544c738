"""The GPU measurement tooling, checked without a GPU.

* benchmarks/gpu_check.py: its float64 reference (the numpy path of the code CuPy runs on the GPU,
  chunked over tokens) against tests/reference.py; its fp16/bf16 grids against numpy / ml_dtypes;
  the dry run's case plan and JSON under the filters; the non-dry path (correctness rows, speed rows,
  JSON, exit status) with a fake CuPy whose "kernels" compute tests/reference.py's attention;
* benchmarks/kernel_registers.py: the cuobjdump parser, the occupancy model against the theoretical
  occupancies Nsight Compute reported on an H200 (/work/shared/GPU_RESULTS.md, section 3), the
  launch-bounds rewrite, and (with nvcc) ptxas honouring the rewritten bounds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from reference import attention_core

ROOT = Path(__file__).resolve().parents[1]
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not on PATH")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gc = _load("gpu_check")
kr = _load("kernel_registers")


# --- the float64 reference and the input grids ------------------------------------------------------

@pytest.mark.parametrize("chunk", [1 << 16, 8, 1])
def test_reference_matches_tests_reference(chunk):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 37, 3 * 5)) * 3 for _ in range(3))
    want = attention_core(q, k, v, heads=3, eps=1e-4)
    got = gc.reference(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), 3, eps=1e-4, xp=np,
                       chunk=chunk)
    want32 = attention_core(*(x.astype(np.float32).astype(np.float64) for x in (q, k, v)), heads=3, eps=1e-4)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want32, rtol=1e-12, atol=1e-12)
    assert not np.allclose(got, want, rtol=1e-12, atol=0)  # it does see the float32 rounding of its inputs


def test_grids_match_numpy_and_ml_dtypes():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal(10000) * 10.0 ** rng.integers(-8, 6, 10000), [1e6, -1e6, 0.0, -0.0]])
    x32 = x.astype(np.float32)
    want16 = np.clip(x32, -57344, 57344).astype(np.float16).astype(np.float32)
    wantbf = np.clip(x32, -57344, 57344).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(gc.on_grid(x, "float16"), want16)
    np.testing.assert_array_equal(gc.on_grid(x, "bfloat16"), wantbf)
    bits = gc.bf16_bits(x32)
    np.testing.assert_array_equal(bits, x32.astype(ml_dtypes.bfloat16).view(np.uint16))
    np.testing.assert_array_equal(gc.from_bf16_bits(bits), x32.astype(ml_dtypes.bfloat16).astype(np.float32))


# --- the dry run: plan, filters, JSON -------------------------------------------------------------

def _dry_run(tmp_path, *flags):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--json", str(out),
                           *flags], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(out.read_text())


@needs_nvcc
def test_dry_run_plan_follows_the_filters_and_writes_json(tmp_path):
    stdout, plan = _dry_run(tmp_path, "--dims", "40,160", "--tokens", "64,5000")
    assert "argument lists match the plugins" in stdout and "dry run ok" in stdout
    assert set(plan) >= {"schema", "dry_run", "machine", "experiment", "correctness", "speed", "ok", "seconds"}
    assert plan["dry_run"] is True and plan["machine"]["gpu"] is None
    assert set(plan["machine"]) >= {"gpu", "driver", "cuda_runtime", "date"}
    # sm_90: fp32 has one tactic; fp16 and bf16 have cuda-core + tensor-core, and at d = 160 also
    # tensor-core-wide (its apply tiling differs). Per (N, d, B): d=40 1+2+2, d=160 1+3+3 cases.
    assert len(plan["correctness"]) == 2 * 2 * (5 + 7)
    for case in plan["correctness"]:
        assert set(case) == {"N", "d", "H", "B", "dtype", "tactic", "error", "bound", "pass"}
        assert case["N"] in (64, 5000) and case["d"] in (40, 160) and case["B"] in (1, 2)
        assert case["H"] == (8 if case["N"] <= 4096 else 2)
        assert case["error"] is None and case["pass"] is None
    assert {c["bound"] for c in plan["correctness"] if c["dtype"] == "bfloat16"} == {1.6e-2}
    assert [(r["d"], r["N"], sorted(r["tactics"])) for r in plan["speed"]] == [
        (40, 64, ["cuda-core", "tensor-core"]), (40, 5000, ["cuda-core", "tensor-core"]),
        (160, 64, ["cuda-core", "tensor-core", "tensor-core-wide"]),
        (160, 5000, ["cuda-core", "tensor-core", "tensor-core-wide"])]
    assert all(r["H"] == 8 and r["B"] == 2 and r["dtype"] == "float16" for r in plan["speed"])
    assert stdout.count("planned ") == len(plan["correctness"]) + len(plan["speed"])


@needs_nvcc
def test_dry_run_speed_only_and_tactic_filter(tmp_path):
    _, plan = _dry_run(tmp_path, "--dims", "64", "--speed-only", "--tactics", "tensor-core")
    assert plan["correctness"] == []
    assert [(r["N"], list(r["tactics"])) for r in plan["speed"]] == [
        (n, ["tensor-core"]) for n in (4096, 16384, 65536, 262144)]
    assert all(r["H"] == 10 for r in plan["speed"])


def test_bad_filter_is_one_line_error():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--dtypes", "fp8"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "unknown dtype or tactic fp8" in proc.stderr


# --- the device path with a fake CuPy ---------------------------------------------------------

class _Event:
    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


def _fake_cupy():
    cuda = types.SimpleNamespace(
        Event=_Event, get_elapsed_time=lambda a, b: 1e3 * (b.t - a.t) + 1e-3,
        Device=lambda: types.SimpleNamespace(synchronize=lambda: None, compute_capability="90"),
        runtime=types.SimpleNamespace(getDeviceProperties=lambda i: {"name": b"Fake GPU", "multiProcessorCount": 132},
                                      driverGetVersion=lambda: 13000, runtimeGetVersion=lambda: 13000))
    rng = np.random.default_rng(5)
    names = ("float16", "float32", "float64", "uint16", "uint32", "asarray", "empty", "ascontiguousarray")
    return types.SimpleNamespace(**{n: getattr(np, n) for n in names}, asnumpy=np.asarray, cuda=cuda,
                                 __version__="fake", random=types.SimpleNamespace(
                                     standard_normal=lambda shape, dtype: rng.standard_normal(shape).astype(dtype)))


class _FakeLauncher:
    """'Kernels' that compute tests/reference.py's attention and round it to the I/O dtype, times scale;
    scale None leaves the poisoned (NaN) output."""

    def __init__(self, cp, scale=1.0):
        self.cp, self.scale = cp, scale

    def kernels(self, q, k, v, heads, dtype, tactic, eps=gc.EPS, poison=True):
        out = np.full(q.shape, 0xFFFF if dtype == "bfloat16" else np.nan, q.dtype)
        decode = (lambda x: gc.from_bf16_bits(x)) if dtype == "bfloat16" else (lambda x: x)

        def apply():
            if self.scale is not None:
                res = (attention_core(*(decode(x).astype(np.float64) for x in (q, k, v)), heads, eps)
                       * self.scale).astype(np.float32)
                out[...] = gc.bf16_bits(res) if dtype == "bfloat16" else res.astype(out.dtype)

        return [("state", lambda: None), ("reduce", lambda: None), ("apply", apply)], out


@pytest.mark.parametrize("scale, status", [(1.0, 0), (1.05, 1), (None, 1)])
def test_device_path_with_fake_cupy(tmp_path, monkeypatch, scale, status, capsys):
    cp = _fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(gc, "build_ptx", lambda *a, **kw: b"")
    monkeypatch.setattr(gc, "check_plumbing", lambda *a: None)
    monkeypatch.setattr(gc, "copy_bandwidth", lambda cp: 2e12)
    monkeypatch.setattr(gc, "Launcher", lambda ptx: _FakeLauncher(cp, scale))
    out = tmp_path / "r.json"
    assert gc.main(["--dims", "8,12", "--tokens", "37", "--json", str(out), "--no-torch", "--reference", "numpy"]) == status
    result = json.loads(out.read_text())
    cases = result["correctness"]
    assert len(cases) == 2 * 2 * 5 and result["ok"] is (status == 0)  # d=8, 12: fp32 1 + fp16 2 + bf16 2 tactics
    assert all(c["pass"] is (status == 0) for c in cases)
    if scale == 1.0:  # only the output rounding of each dtype is left
        worst = {dt: max(c["error"] for c in cases if c["dtype"] == dt) for dt in gc.TOL}
        assert worst["float32"] < 1e-6 and 1e-5 < worst["float16"] < 1e-3 and 1e-4 < worst["bfloat16"] < 8e-3
    elif scale is None:
        assert all(c["error"] is None for c in cases) and "non-finite" in capsys.readouterr().out
    else:
        assert all(c["error"] > 3e-2 for c in cases)
    assert result["machine"]["gpu"] == "Fake GPU" and result["machine"]["cuda_runtime"] == "13.0"
    assert [(r["d"], r["N"], r["H"], r["B"]) for r in result["speed"]] == [(8, 37, 8, 2), (12, 37, 8, 2)]
    for row in result["speed"]:
        assert row["best"] in row["tactics"] and row["unfused_torch_ms"] is None
        for t in row["tactics"].values():
            assert set(t) == {"state_ms", "reduce_ms", "apply_ms", "total_ms", "gbs", "copy_pct", "kernels"}
            moved = 4 * 2 * 37 * row["H"] * row["d"] * 2  # q, k, v, out in fp16
            assert t["gbs"] == pytest.approx(moved / (t["total_ms"] / 1e3) / 1e9)
            assert t["copy_pct"] == pytest.approx(100 * t["gbs"] / 2e3)


# --- kernel_registers.py --------------------------------------------------------------------------

CUOBJDUMP_SAMPLE = """
Resource usage:
 Common:
  GLOBAL:0
 Function linfusion_la_apply_f32_d160:
  REG:61 STACK:0 SHARED:48000 LOCAL:0 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function linfusion_la_state_tc_f16_d64:
  REG:120 STACK:16 SHARED:11264 LOCAL:24 CONSTANT[0]:560 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_resource_usage():
    usage = kr.parse_resource_usage(CUOBJDUMP_SAMPLE)
    assert set(usage) == {"linfusion_la_apply_f32_d160", "linfusion_la_state_tc_f16_d64"}
    assert usage["linfusion_la_state_tc_f16_d64"]["REG"] == 120
    assert usage["linfusion_la_state_tc_f16_d64"]["STACK"] == 16
    assert usage["linfusion_la_state_tc_f16_d64"]["LOCAL"] == 24
    assert usage["linfusion_la_apply_f32_d160"]["SHARED"] == 48000


@pytest.mark.parametrize("regs, threads, smem, occupancy, limiter", [
    (112, 128, 10240, 0.25, "registers"),      # state tc d=64: Nsight 25 %
    (110, 256, 28800, 0.25, "registers"),      # apply tc d=64: 25 %
    (168, 320, 25600, 10 / 64, "registers"),   # state tc d=160: 16 %
    (168, 64, 40320, 10 / 64, "shared memory"),  # apply tc-wide d=160: 16 %, 5 blocks of 2 warps
    (32, 256, 0, 1.0, "registers"),            # reduce: 100 %
])
def test_occupancy_matches_nsight_on_h200(regs, threads, smem, occupancy, limiter):
    occ = kr.occupancy(regs, threads, smem)
    assert occ["occupancy"] == pytest.approx(occupancy)
    assert occ["limiter"] == limiter


def test_min_blocks_rewrites_one_family_only():
    K = kr.load_kernel_build()
    source = K.kernel_source([("float16", 64)])
    new = kr.with_min_blocks(source, {"state_tc": 3, "apply": 2})
    changed = [(a, b) for a, b in zip(source.split("\n"), new.split("\n")) if a != b]
    assert len(changed) == 2
    assert all("__launch_bounds__" in a for a, _ in changed)
    assert any("/ 16) * 32, 3)" in b for _, b in changed)  # state_tc: __launch_bounds__((((D) + 15) / 16) * 32, 3)
    assert any("((TJ_A) / 4), 2)" in b for _, b in changed)  # apply (CUDA-core)
    with pytest.raises(SystemExit, match="choose from"):
        kr.with_min_blocks(source, {"nonsense": 2})


@needs_nvcc
def test_ptxas_report_and_launch_bounds_experiment():
    K = kr.load_kernel_build()
    variants = [("float16", 64)]
    rows = {r.kernel: r for r in kr.report(K, variants, min_blocks={"apply_tc": 3})}
    assert set(rows) == K.kernel_names(variants, "sm_90")
    assert all(0 < r.regs <= 255 and 0 < r.occupancy <= 1 for r in rows.values())
    apply_tc = rows[K.apply_kernel("float16", 64, K.TENSOR_CORE)]
    assert apply_tc.threads == 256 and apply_tc.regs <= 65536 // (3 * 256)  # what __launch_bounds__(256, 3) promises
    assert apply_tc.blocks_per_sm >= 3


def test_kernel_registers_without_nvcc_skips_cleanly(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_registers.py")], env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("skipped: nvcc is not on PATH")
