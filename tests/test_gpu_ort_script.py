"""benchmarks/gpu_ort.py and gpu_ort.sh, the ONNX Runtime CUDA measurement, checked without a GPU.

The helpers against hand-derived values and an independent PSNR (the validation package's); the
nvidia-smi sampler against a fake nvidia-smi printing a hand-written sample; the import of linfusion
from the checkout with the editable install hidden; the wrapper's part staging; and the whole script
in --dry-run (CPU provider, tiny-sd, torch on the CPU): its JSON (schema, positive times, finite
values) and ORT fp16 outputs against PyTorch's at the finiteness sizes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_ort.py"
spec = importlib.util.spec_from_file_location("_tool_gpu_ort", SCRIPT)
go = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = go
spec.loader.exec_module(go)


def strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"non-finite number {name} in {path}")
    return json.loads(path.read_text(), parse_constant=refuse)


# --- helpers -----------------------------------------------------------------------------------------

def test_psnr_hand_values_and_the_validation_implementation():
    a = np.zeros((1, 8, 8, 3))
    assert go.psnr(a, a + 0.1) == pytest.approx(20.0)  # MSE 0.01
    assert go.psnr(a, a + 0.01) == pytest.approx(40.0)
    assert go.psnr(a, a) is None
    from linfusion.export.validation.end_to_end import EndToEndSettings, compare_images
    from linfusion.export.comparison.tolerances import IMAGE_TOLERANCES

    rng = np.random.default_rng(0)
    x = rng.random((1, 16, 16, 3))
    y = np.clip(x + rng.normal(0, 0.02, x.shape), 0, 1)
    other = compare_images("x", EndToEndSettings(16, 16), y, x, IMAGE_TOLERANCES["fp16"])
    assert go.psnr(y, x) == pytest.approx(other.psnr, rel=1e-12)


SMI_SAMPLE = """\
2026/11/30 12:00:00.050, 1024
2026/11/30 12:00:00.100, 81920
2026/11/30 12:00:00.150, [N/A]
2026/11/30 12:00:00.200, 2048
"""


def test_parse_smi_line():
    assert [go.parse_smi_line(x) for x in SMI_SAMPLE.splitlines()] == [1024.0, 81920.0, None, 2048.0]
    assert go.parse_smi_line("No devices were found") is None
    assert go.parse_smi_line("") is None


def test_smi_samples_read_a_streaming_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{SMI_SAMPLE}EOF\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert list(go.smi_samples()) == [1024.0, 81920.0, None, 2048.0]
    poller = go.MemoryPoller("fake", go.smi_samples(), idle=1000.0, settle=0.0)
    poller.thread.join(timeout=10)
    assert poller.peak() == 80920.0  # largest sample minus idle; [N/A] skipped
    poller.mark()
    assert poller.peak() == 1048.0  # after mark: from the last sample on


def test_memory_poller_windows():
    import queue

    q: queue.Queue = queue.Queue()
    poller = go.MemoryPoller("queue", iter(q.get, "stop"), idle=10.0, settle=0.0)

    def feed(*values):
        for v in values:
            q.put(v)
        deadline = time.time() + 5
        while poller.last != values[-1] and time.time() < deadline:
            time.sleep(0.01)

    assert poller.peak() is None
    feed(50.0, 500.0, 60.0)
    assert poller.peak() == 490.0
    poller.mark()
    feed(70.0, 65.0)
    assert poller.peak() == 60.0
    q.put("stop")


def test_rel_error_finite_summary_and_clean():
    ref = np.array([1.0, -2.0, 4.0])
    got = np.array([1.0, -2.0, 4.2])
    err = go.rel_error(got, ref)
    assert err["max_rel_error"] == pytest.approx(0.05)
    assert err["cosine"] == pytest.approx((1 + 4 + 16.8) / (math.sqrt(21) * math.sqrt(1 + 4 + 4.2**2)))
    assert go.finite_summary(np.array([1.0, np.inf], np.float16)) == {"finite": False, "std": None, "max_abs": None}
    assert go.finite_summary(np.array([-3.0, 1.0]))["max_abs"] == 3.0
    cleaned = go.clean({"a": [np.float32(1.5), float("nan")], "b": (np.int64(3), float("-inf")), 1: np.bool_(True)})
    assert cleaned == {"a": [1.5, None], "b": [3, None], "1": True}
    json.dumps(cleaned, allow_nan=False)


def test_runtime_options_use_new_backend_options_only_where_the_api_has_them():
    args = type("A", (), {"providers": ["CUDAExecutionProvider"], "provider_options": '{"device_id": 0}',
                          "io_binding": "off"})()

    class Old:
        @classmethod
        def from_export(cls, directory, backend="auto", providers=None, verify=True, intra_op_threads=0):
            pass

    class New:
        @classmethod
        def from_export(cls, directory, backend="auto", providers=None, verify=True, intra_op_threads=0,
                        provider_options=None, io_binding=True):
            pass

    kwargs, info = go.runtime_options(Old, args)
    assert kwargs == {"backend": "onnxruntime", "providers": ["CUDAExecutionProvider"]}
    kwargs, info = go.runtime_options(New, args)
    assert kwargs["provider_options"] == {"device_id": 0} and kwargs["io_binding"] is False
    assert info["passed"]["io_binding"] is False and "provider_options" in info["from_export"]
    from linfusion.runtime import Pipeline  # today's API: accepted without error
    assert set(go.runtime_options(Pipeline, args)[0]) <= set(inspect.signature(Pipeline.from_export).parameters)


def test_linfusion_imports_from_the_checkout_with_nothing_installed():
    code = textwrap.dedent(f"""
        import importlib.util, sys
        sys.meta_path = [f for f in sys.meta_path
                         if "editable" not in (f.__module__ if isinstance(f, type) else type(f).__module__)]
        spec = importlib.util.spec_from_file_location("g", {str(SCRIPT)!r})
        g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)
        how = g.use_checkout()
        import linfusion.runtime.pipeline, linfusion.export.comparison.tolerances, linfusion.presets
        print("|".join([how, linfusion.runtime.pipeline.__file__, linfusion.export.comparison.tolerances.__file__,
                        linfusion.presets.__file__, str("torch" in sys.modules)]))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                          env={**os.environ, "LINFUSION_FROM_CHECKOUT": "1"}, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    how, pipeline, tolerances, presets, torch_loaded = done.stdout.strip().split("|")
    assert how.startswith("checkout")
    assert pipeline == str(ROOT / "runtime" / "pipeline.py")
    assert tolerances == str(ROOT / "export" / "comparison" / "tolerances.py")
    assert presets == str(ROOT / "linfusion" / "presets.py") and torch_loaded == "False"


def test_wrapper_stages_parts_across_calls(tmp_path):
    carry, stage = tmp_path / "carry", tmp_path / "stage"
    wheel = "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    parts = {f"{wheel}.part-0{i}": os.urandom(100) for i in range(2)}
    sums = "".join(f"{hashlib.sha256(b).hexdigest()}  {n}\n" for n, b in parts.items()) + f"{'0' * 64}  {wheel}\n"
    env = {**os.environ, "CARRY": str(carry), "STAGE": str(stage)}
    for i, (name, data) in enumerate(parts.items()):
        folder = carry / f"ort-{i + 1}"
        folder.mkdir(parents=True)
        (folder / name).write_bytes(data)
        (folder / "SHA256SUMS").write_text(sums)
        done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_ort.sh"), "stage"], capture_output=True,
                              text=True, env=env, check=False)
        assert done.returncode == 0 and f"parts: have {i + 1} of 2" in done.stdout, done.stdout + done.stderr
        for old in carry.glob("ort-*"):  # the next call carries only the next part
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
    assert sorted(p.name for p in stage.joinpath("parts").iterdir()) == sorted([*parts, "SHA256SUMS"])


# --- the whole script, dry run -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu-ort")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-W", "ignore", str(SCRIPT), "--dry-run", "--out", str(base / "out"),
                           "--work", str(base / "work")], capture_output=True, text=True, timeout=1200,
                          cwd=ROOT, env={**os.environ, "LINFUSION_FROM_CHECKOUT": "1"}, check=False)
    print(f"dry run: {time.perf_counter() - start:.0f} s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return base


@pytest.mark.slow
def test_dry_run_writes_a_complete_record(dry_run):
    r = strict_json(dry_run / "out" / "gpu_ort.json")
    assert r["study"] == "gpu_ort" and r["dry_run"] and r["errors"] == [] and r["date"]
    assert r["returncodes"] == {"export": 0, "ort": 0, "torch": 0}
    assert set(r["machine"]) >= {"cpu", "cores", "python", "packages", "gpu", "onnxruntime", "torch"}
    assert r["machine"]["onnxruntime"]["version"] and r["machine"]["torch"]["version"]
    assert all(p["import"].startswith("checkout") for p in r["phases"].values())
    sizes = r["config"]["sizes"]
    assert len(sizes) >= 2
    for engine in go.ENGINES:
        rows = [x for x in r["unet_step"] if x["engine"] == engine]
        assert [x["side_px"] for x in rows] == sizes, engine
        for x in rows:
            assert x["seconds"] > 0 and x["first_call_s"] > 0 and x["device_mib"] > 0
            assert len(x["all_seconds"]) == r["config"]["repeats"] and min(x["all_seconds"]) > 0
            assert min(x["all_seconds"]) <= x["seconds"] <= max(x["all_seconds"])
    assert [x["side_px"] for x in r["ratios"]] == sizes
    for x in r["ratios"]:
        assert x["eager_over_runtime"] > 0 and x["sdpa_over_runtime"] > 0
        assert x["target_met"] is None  # every dry-run size is under 1024 px
        # the runtime's UNet output (fp16 export) against PyTorch's LinFusion UNet (fp32 on the CPU), same inputs
        assert x["runtime_vs_eager"]["max_rel_error"] < 2e-2 and x["runtime_vs_eager"]["cosine"] > 0.9999
    rt, df = r["end_to_end"]["runtime"], r["end_to_end"]["diffusers_linfusion"]
    for key in ("total", "encode", "denoise", "decode", "unet_run_per_step_s", "device_mib"):
        assert rt[key] > 0, key
    assert rt["steps"] == r["config"]["steps"] and len(rt["runs"]) == 1 + r["config"]["e2e_repeats"]
    assert rt["denoise"] < rt["total"] and math.isfinite(rt["outside_unet_ms_per_step"])
    assert abs(rt["outside_unet_share_pct"]) < 100
    assert df["total"] > 0 and df["device_mib"] > 0
    p = r["psnr"]
    assert p["passed"] and p["bound_db"] == 40.0 and (p["identical"] or p["psnr_db"] >= 40.0)
    assert "(dry run" in r["memory_source"]["runtime"] and "(dry run" in r["memory_source"]["torch"]
    assert "| px | batch |" in (dry_run / "out" / "gpu_ort.md").read_text()


@pytest.mark.slow
def test_dry_run_fp16_outputs_are_finite_and_match_pytorch(dry_run):
    r = strict_json(dry_run / "out" / "gpu_ort.json")
    assert [f["side_px"] for f in r["finite"]] == r["config"]["finite_sizes"]
    for f in r["finite"]:
        assert f["finite"] and f["std"] > 0.1 and f["seconds"] > 0
        # ORT on the fp16 export against PyTorch's LinFusion UNet on the same inputs (fp32 on the CPU)
        assert f["vs_linfusion_eager"]["max_rel_error"] < 2e-2 and f["vs_linfusion_eager"]["cosine"] > 0.9999


@pytest.mark.slow
def test_skip_export_reuses_the_work_folder(dry_run, tmp_path):
    done = subprocess.run([sys.executable, "-W", "ignore", str(SCRIPT), "--dry-run", "--skip-export",
                           str(dry_run / "work"), "--phases", "ort", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = strict_json(tmp_path / "gpu_ort.json")
    assert r["returncodes"] == {"ort": 0} and "export" not in r["phases"]
    assert {x["engine"] for x in r["unet_step"]} == {"runtime"} and r["end_to_end"]["diffusers_linfusion"] is None
    missing = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--skip-export", str(tmp_path)],
                             capture_output=True, text=True, cwd=ROOT, check=False)
    assert missing.returncode == 2 and "run without --skip-export" in missing.stdout
