"""The TensorRT runtime backend: CPU-checkable parts, and GPU tests that skip without TensorRT."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from linfusion.runtime.engine_manifest import EngineSpec, ProfileSpec


def _has_tensorrt_and_gpu() -> str | None:
    """None when TensorRT and a CUDA GPU are usable, else the reason to skip."""
    try:
        import tensorrt as trt
    except ImportError:
        return "TensorRT is not installed"
    if not hasattr(trt, "Builder"):
        return "the tensorrt package is a stub without its libraries"
    try:
        from linfusion.runtime.backends.tensorrt import current_gpu

        current_gpu()
    except Exception as exc:  # noqa: BLE001
        return f"no CUDA GPU usable through cuda-python: {exc}"
    return None


SKIP_REASON = _has_tensorrt_and_gpu()
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]


def test_backend_module_imports_no_torch_export_or_engines():
    code = ("import sys, linfusion.runtime.backends.tensorrt as t; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('linfusion.export', 'linfusion.engines', "
            "'tensorrt'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_not_available_without_engines(tmp_path):
    from linfusion.runtime.backends.tensorrt import TensorRTBackend

    assert TensorRTBackend.is_available(tmp_path) is False


def test_select_refuses_tensorrt_clearly_without_it(tmp_path, monkeypatch):
    from linfusion.runtime.backends.select import BackendError, load_backend

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendError, match="TensorRT"):
        load_backend("tensorrt", tmp_path)
    assert load_backend("auto", tmp_path).name == "onnxruntime"


def test_check_shapes_uses_the_engine_profiles():
    from linfusion.runtime.backends.base import ShapeError
    from linfusion.runtime.backends.tensorrt import TensorRTRunner
    from linfusion.runtime.contract import ComponentSpec, TensorSpec

    spec = ComponentSpec(kind="unet", path="unet/model.onnx", precision="fp16",
                         inputs=[TensorSpec("sample", "float16", ["batch", 4, "height", "width"])],
                         outputs=[TensorSpec("out_sample", "float16", ["batch", 4, "height", "width"])])
    engine = EngineSpec("unet.plan", "0", "unet/model.onnx", "1", "fp16",
                        [ProfileSpec({"sample": [[1, 4, 64, 64], [2, 4, 96, 96], [4, 4, 128, 128]]}),
                         ProfileSpec({"sample": [[1, 4, 64, 64], [2, 4, 192, 192], [4, 4, 256, 256]]})])
    runner = TensorRTRunner.__new__(TensorRTRunner)  # no TensorRT needed for the shape check
    runner.name, runner.spec, runner.engine_spec, runner.engine_inputs = "unet", spec, engine, ["sample"]
    runner.check_shapes({"sample": (2, 4, 200, 72)})
    with pytest.raises(ShapeError, match="outside the TensorRT engine's optimization profiles"):
        runner.check_shapes({"sample": (2, 4, 300, 300)})
    with pytest.raises(ShapeError, match="outside"):
        runner.check_shapes({"sample": (8, 4, 64, 64)})
    with pytest.raises(ShapeError, match="the model takes"):
        runner.check_shapes({"sample": (1, 3, 64, 64)})


# --- on a GPU with TensorRT (pytest -m gpu) -------------------------------------------------------

@pytest.fixture(scope="module")
def built(exported, tmp_path_factory):
    from linfusion.engines.builder import BuildOptions, build_all
    from linfusion.engines.profiles import Range, spatial_profiles
    from linfusion.runtime.manifest import load_manifest

    directory = exported("tiny-sd", "fp16")
    multiple = load_manifest(directory).pixel_multiple
    out = directory / "engines"
    build_all(directory, BuildOptions(spatial=spatial_profiles(multiple, 64, 128, 256), batch=Range(1, 1, 2),
                                      output=out, plugin="on", timing_cache=out / "timing.cache"), log=print)
    return directory


@pytest.mark.gpu
@pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
def test_built_engines_match_onnxruntime(built):
    from linfusion.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from linfusion.runtime.backends.tensorrt import TensorRTBackend
    from linfusion.runtime.manifest import load_manifest

    manifest = load_manifest(built)
    engines = json.loads((built / "engines" / "engines.json").read_text())
    assert engines["components"]["unet"]["plugin"] is True
    assert TensorRTBackend.is_available(built)
    spec = manifest.components["unet"]
    trt_runner = TensorRTBackend().load(built, "unet", spec)
    ort_runner = OnnxRuntimeBackend(providers=["CPUExecutionProvider"]).load(built, "unet", spec)
    rng = np.random.default_rng(0)
    hidden = spec.input("encoder_hidden_states").shape
    for batch, h, w in ((2, 16, 24), (1, 32, 32)):
        feed = {"sample": rng.standard_normal((batch, 4, h, w)).astype(np.float16),
                "timestep": np.full(batch, 500.0, np.float32),
                "encoder_hidden_states": rng.standard_normal((batch, hidden[1], hidden[2])).astype(np.float16)}
        got = trt_runner.run(feed)["out_sample"].astype(np.float64)
        want = ort_runner.run(feed)["out_sample"].astype(np.float64)
        assert np.abs(got - want).max() / np.abs(want).max() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
def test_engines_for_another_gpu_are_refused(built, tmp_path):
    import shutil

    from linfusion.runtime.backends.tensorrt import TensorRTBackend
    from linfusion.runtime.engine_manifest import EngineManifestError

    copy = tmp_path / "export"
    shutil.copytree(built, copy)
    path = copy / "engines" / "engines.json"
    data = json.loads(path.read_text())
    data["gpu_name"], data["compute_capability"] = "Imaginary GPU", "1.0"
    path.write_text(json.dumps(data))
    assert not TensorRTBackend.is_available(copy)
    with pytest.raises(EngineManifestError, match="rebuild"):
        TensorRTBackend().manifest(copy)


@pytest.mark.gpu
@pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
def test_generation_on_engines_matches_onnxruntime(built):
    """A whole text-to-image run on the engines (plugins in the UNet) against ONNX Runtime."""
    from linfusion.runtime.pipeline import Pipeline

    args = {"prompt": "a red cube", "height": 128, "width": 128, "num_inference_steps": 4, "seed": 3,
            "output_type": "np"}
    got = Pipeline.from_export(built, backend="tensorrt")(**args).images.astype(np.float64)
    want = Pipeline.from_export(built, backend="onnxruntime", providers=["CPUExecutionProvider"])(
        **args).images.astype(np.float64)
    mse = np.mean((got - want) ** 2)
    assert mse == 0 or 10 * np.log10(1.0 / mse) >= 30, f"PSNR {10 * np.log10(1.0 / mse):.1f} dB"


@pytest.mark.gpu
@pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
def test_plugin_off_inlines_the_attention_and_matches(exported, tmp_path):
    from linfusion.engines.builder import BuildOptions, build_all
    from linfusion.engines.profiles import Range, spatial_profiles
    from linfusion.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from linfusion.runtime.backends.tensorrt import TensorRTBackend
    from linfusion.runtime.manifest import load_manifest

    directory = exported("tiny-sd", "fp32")
    manifest = load_manifest(directory)
    out = tmp_path / "engines-off"
    result = build_all(directory, BuildOptions(spatial=spatial_profiles(manifest.pixel_multiple, 64, 128, 128),
                                               batch=Range(1, 1, 1), output=out, plugin="off",
                                               components=["unet"]), log=print)
    assert result.components["unet"].plugin is False and result.plugin["enabled"] is False
    import shutil

    export_copy = tmp_path / "export"
    shutil.copytree(directory, export_copy, ignore=shutil.ignore_patterns("engines"))
    shutil.copytree(out, export_copy / "engines")
    spec = manifest.components["unet"]
    trt_runner = TensorRTBackend().load(export_copy, "unet", spec)
    ort_runner = OnnxRuntimeBackend(providers=["CPUExecutionProvider"]).load(directory, "unet", spec)
    rng = np.random.default_rng(1)
    hidden = spec.input("encoder_hidden_states").shape
    feed = {"sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
            "timestep": np.full(2, 300.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, hidden[1], hidden[2])).astype(np.float32)}
    got = trt_runner.run(feed)["out_sample"].astype(np.float64)
    want = ort_runner.run(feed)["out_sample"].astype(np.float64)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-3
