"""The thin TensorRT layer's own logic, on the CPU (TensorRT cannot be installed here).

The fakes below stand in only for what TensorRT decides (its version, whether it accepts a
timing cache or a profile); each test checks what *our* code does with the answer. The rules
the plugin registrations must follow are those of ``tensorrt.plugin``'s validator (TensorRT
10.9-11.1, python/packaging/bindings_wheel/tensorrt/plugin/_validate.py): annotations are
inspected as classes, so they must not be strings, and ``aot_impl`` needs a return annotation.
"""

import inspect
import os
import signal
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest
from linfusion.engines import builder as B
from linfusion.engines import kernel_build as K
from linfusion.engines import plugin as P
from linfusion.engines.cli import parser as cli_parser
from linfusion.runtime.engine_manifest import ProfileSpec

# --- versions, tactics and the engines.json record ---------------------------------------------


def _fake_trt(version: str, quick: bool = True):
    trt = types.SimpleNamespace(__version__=version)
    if quick:
        trt.QuickPluginCreationRequest = object()
    return trt


@pytest.mark.parametrize("version,ok", [("10.8.0.43", False), ("10.9.0.34", False), ("10.10.0.31", True),
                                        ("10.15.1.29", True), ("11.1.0.12", True)])
def test_aot_support_needs_tensorrt_10_10(version, ok, monkeypatch):
    package = types.ModuleType("tensorrt")
    package.plugin = types.ModuleType("tensorrt.plugin")
    monkeypatch.setitem(sys.modules, "tensorrt", package)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", package.plugin)
    supported, why = P.aot_support(_fake_trt(version))
    assert supported is ok
    if not ok:
        assert version in why and "10.10" in why


def test_aot_support_names_a_missing_quick_plugin_api(monkeypatch):
    supported, why = P.aot_support(_fake_trt("10.12.0", quick=False))
    assert not supported and "QuickPluginCreationRequest" in why


def test_offered_tactics():
    assert P.offered_tactics("float32", "compute_90") == (K.CUDA_CORE,)
    assert P.offered_tactics("float16", "compute_90") == (K.CUDA_CORE, K.TENSOR_CORE, K.TENSOR_CORE_WIDE)
    assert P.offered_tactics("bfloat16", "compute_80", "tensor-core") == (K.TENSOR_CORE, K.TENSOR_CORE_WIDE)
    assert P.offered_tactics("float16", "compute_90", "cuda-core") == (K.CUDA_CORE,)
    assert P.offered_tactics("float16", "compute_75") == (K.CUDA_CORE,)  # mma.m16n8k16 needs sm_80
    with pytest.raises(P.PluginUnavailable, match="8.0"):
        P.offered_tactics("float16", "compute_75", "tensor-core")
    with pytest.raises(ValueError, match="auto"):
        P.offered_tactics("float16", "compute_90", "fastest")


def test_plugin_record_lists_sources_and_tactics():
    record = P.plugin_record(True, "compute_90")
    half = ["cuda-core", "tensor-core", "tensor-core-wide"]
    assert record["kernel_tactics"] == {"float32": ["cuda-core"], "float16": half, "bfloat16": half}
    root = Path(__file__).resolve().parents[1]
    assert all((root / path).is_file() for path in record["kernel_source"])
    assert "kernel_tactics" not in P.plugin_record(False)


# --- the registrations obey tensorrt.plugin's signature rules ----------------------------------


class _RecordingPluginModule(types.ModuleType):
    """Records the functions handed to register / autotune / aot_impl; builds nothing."""

    def __init__(self) -> None:
        super().__init__("tensorrt.plugin")
        self.functions: dict[tuple[str, str], typing.Callable] = {}
        for kind in ("register", "autotune", "aot_impl"):
            setattr(self, kind, self._decorator(kind))
        for name in ("TensorDesc", "KernelLaunchParams", "SymIntExprs", "AutoTuneCombination"):
            setattr(self, name, type(name, (), {}))

    def _decorator(self, kind):
        def decorate(plugin_id):
            def keep(fn):
                self.functions[(kind, plugin_id)] = fn
                return fn
            return keep
        return decorate


def test_registrations_have_class_annotations_and_aot_return_types(monkeypatch):
    trtp = _RecordingPluginModule()
    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.QuickPluginCreationRequest, trt.plugin = "10.12.0.36", object(), trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(P, "_registered", {})
    P.register_plugins("compute_90")
    assert {pid for _, pid in trtp.functions} == set(P.PLUGIN_IDS)
    assert len(trtp.functions) == 9
    for (kind, plugin_id), fn in trtp.functions.items():
        signature = inspect.signature(fn)
        for param in signature.parameters.values():
            assert not isinstance(param.annotation, str), f"{kind} {plugin_id}: '{param.name}' is a string annotation"
            if param.name in ("heads", "eps"):  # the parser sends 1-element int32 / float32 arrays
                args = typing.get_args(typing.get_args(param.annotation)[1])
                assert args == ((np.int32,) if param.name == "heads" else (np.float32,))
        if kind == "aot_impl":
            ret = signature.return_annotation
            assert ret is not inspect.Signature.empty, f"{plugin_id}: aot_impl needs a return annotation"
            assert typing.get_args(ret)[2:] == (trtp.KernelLaunchParams, trtp.SymIntExprs)
            assert list(signature.parameters)[-2:] == ["outputs", "tactic"]
    with pytest.raises(P.PluginUnavailable, match="already registered"):
        P.register_plugins("compute_80")


# --- builder pieces ----------------------------------------------------------------------------


class _Flag:
    STRONGLY_TYPED = 1


@pytest.mark.parametrize("version,flags", [("10.12.0.36", 1 << 1), ("11.1.0.12", 0)])
def test_network_flags_strongly_typed_only_where_it_is_not_the_default(version, flags):
    trt = types.SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=_Flag)
    assert B.network_flags(trt) == flags


class _FakeConfig:
    """TensorRT's answers: which caches it accepts, which profile index it assigns."""

    def __init__(self, accept: bool = True, bad_data: bool = False, profile_index=None) -> None:
        self.accept, self.bad_data, self.profile_index = accept, bad_data, profile_index
        self.set_caches, self.profiles = [], []

    def create_timing_cache(self, data: bytes):
        return None if (data and self.bad_data) else ("cache", bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        self.set_caches.append(cache)
        return self.accept or cache == ("cache", b"")

    def add_optimization_profile(self, profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1 if self.profile_index is None else self.profile_index


@pytest.mark.parametrize("accept,bad_data", [(False, False), (True, True)])
def test_timing_cache_from_another_gpu_or_damaged_starts_fresh(tmp_path, accept, bad_data):
    path = tmp_path / "timing.cache"
    path.write_bytes(b"old cache")
    config, lines = _FakeConfig(accept=accept, bad_data=bad_data), []
    assert B.use_timing_cache(config, path, lines.append) == ("cache", b"")
    assert config.set_caches[-1] == ("cache", b"") and "starting a new one" in lines[0]


def test_timing_cache_is_reused_when_accepted(tmp_path):
    path = tmp_path / "timing.cache"
    path.write_bytes(b"old cache")
    config = _FakeConfig()
    assert B.use_timing_cache(config, path, print) == ("cache", b"old cache")
    assert B.use_timing_cache(_FakeConfig(), tmp_path / "absent.cache", print) == ("cache", b"")


def test_default_timing_cache_is_per_version_and_gpu(tmp_path):
    assert B.default_timing_cache(tmp_path, "10.12.0.36", "9.0").name == "timing-10.12.0.36-sm90.cache"


class _FakeProfile:
    def __init__(self) -> None:
        self.shapes = {}

    def set_shape(self, name, low, opt, high) -> None:
        self.shapes[name] = (low, opt, high)


class _FakeBuilder:
    def create_optimization_profile(self):
        return _FakeProfile()


def _spec(**shapes) -> ProfileSpec:
    return ProfileSpec(shapes={name: ([1, 4], [2, 4], [4, 4]) for name in shapes})


def test_profiles_are_added_in_order_and_checked():
    inputs = {"sample": (-1, 4), "timestep": (1,)}
    config = _FakeConfig()
    B.add_profiles(_FakeBuilder(), config, inputs, [_spec(sample=1), _spec(sample=1)], Path("unet.onnx"))
    assert [p.shapes["sample"] for p in config.profiles] == [([1, 4], [2, 4], [4, 4])] * 2
    with pytest.raises(B.BuildError, match="no shape range for dynamic input"):
        B.add_profiles(_FakeBuilder(), _FakeConfig(), {"sample": (-1, 4), "ids": (-1, 77)}, [_spec(sample=1)],
                       Path("m.onnx"))
    with pytest.raises(B.BuildError, match="lacks"):
        B.add_profiles(_FakeBuilder(), _FakeConfig(), inputs, [_spec(sample=1, latent=1)], Path("m.onnx"))
    with pytest.raises(B.BuildError, match="rejected optimization profile 0"):
        B.add_profiles(_FakeBuilder(), _FakeConfig(profile_index=-1), inputs, [_spec(sample=1)], Path("m.onnx"))


def test_ctrl_c_during_a_build_becomes_a_flag_and_cancels_at_the_next_step():
    """TensorRT swallows exceptions raised in the progress monitor, so SIGINT must only set a flag
    that the monitor's step_complete turns into a cancelled build."""
    before = signal.getsignal(signal.SIGINT)
    trt = types.SimpleNamespace(IProgressMonitor=type("IProgressMonitor", (), {"__init__": lambda self: None}))
    with B._InterruptFlag() as interrupted:
        monitor = B._Progress.create(trt, lambda line: None, interrupted)
        assert monitor.step_complete("Building", 0) is True
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # the handler runs at the next bytecode boundary
            if interrupted.is_set():
                break
        assert monitor.step_complete("Building", 1) is False
    assert interrupted.is_set()
    assert signal.getsignal(signal.SIGINT) is before


def test_network_flags_refuse_a_tensorrt_without_strong_typing():
    trt = types.SimpleNamespace(__version__="9.3.0", NetworkDefinitionCreationFlag=types.SimpleNamespace())
    with pytest.raises(B.TensorRTMissing, match="strongly typed"):
        B.network_flags(trt)


@pytest.mark.parametrize("nvrtc,driver,refusal", [
    ((12, 4), (12, 4), None), ((12, 8), (13, 0), None),
    ((12, 9), (12, 4), r"nvidia-cuda-nvrtc-cu12==12\.4\.\*"),
    ((13, 5), (13, 0), r"'nvidia-cuda-nvrtc==13\.0\.\*'"),
    ((13, 0), (12, 8), r"linfusion-deploy\[gpu\]")])
def test_nvrtc_newer_than_the_driver_is_refused(monkeypatch, nvrtc, driver, refusal):
    monkeypatch.setattr(K, "nvrtc_version", lambda: nvrtc)
    monkeypatch.setattr(B, "driver_cuda_version", lambda: driver)
    if refusal is None:
        assert B.check_nvrtc_against_driver(lambda line: None) == f"{nvrtc[0]}.{nvrtc[1]}"
    else:
        with pytest.raises(B.BuildError, match=refusal):
            B.check_nvrtc_against_driver(lambda line: None)


def test_kernel_tactic_falls_back_to_the_nearest_existing_kernels():
    assert K.kernel_tactic(K.TENSOR_CORE, "float16", "compute_90", 64) == K.TENSOR_CORE
    assert K.kernel_tactic(K.TENSOR_CORE_WIDE, "float16", "compute_90", 160) == K.TENSOR_CORE_WIDE
    assert K.kernel_tactic(K.TENSOR_CORE_WIDE, "float16", "compute_90", 64) == K.TENSOR_CORE  # same tiling
    assert K.kernel_tactic(0, "float16", "compute_90", 64) == K.CUDA_CORE  # TensorRT's default tactic
    assert K.kernel_tactic(K.TENSOR_CORE, "float16", "compute_90", 200) == K.CUDA_CORE  # beyond d = 192
    assert K.kernel_tactic(K.TENSOR_CORE_WIDE, "float32", "compute_90", 64) == K.CUDA_CORE
    assert K.kernel_tactic(K.TENSOR_CORE, "bfloat16", "compute_75", 64) == K.CUDA_CORE


def test_cli_attention_kernels_option():
    assert cli_parser().parse_args(["d"]).attention_kernels == "auto"
    assert cli_parser().parse_args(["d", "--attention-kernels", "tensor-core"]).attention_kernels == "tensor-core"
    with pytest.raises(SystemExit):
        cli_parser().parse_args(["d", "--attention-kernels", "fastest"])


def test_an_interrupted_build_records_the_engines_it_replaced(exported, tmp_path, monkeypatch):
    """TensorRT itself is faked at build_engine; what is tested is build_all's bookkeeping: after
    a Ctrl-C in the second engine, engines.json lists the first with the sha256 of the new file."""
    import hashlib
    import json
    import shutil

    from linfusion.engines.profiles import Range, spatial_profiles
    from linfusion.runtime.engine_manifest import load_engine_manifest
    from linfusion.runtime.manifest import load_manifest

    export = tmp_path / "export"
    shutil.copytree(exported("tiny-sd"), export, ignore=shutil.ignore_patterns("engines"))
    names = list(load_manifest(export).components)[:2]
    calls = []

    def fake_build(trt, onnx_path, profiles, options, log):
        calls.append(onnx_path.parent.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return memoryview(f"engine for {onnx_path.parent.name}".encode())

    monkeypatch.setattr(B, "builder_tensorrt", lambda: types.SimpleNamespace(__version__="10.12.0.36"))
    monkeypatch.setattr(B, "gpu_info", lambda: ("Fake GPU", "9.0"))
    monkeypatch.setattr(B, "build_engine", fake_build)
    out = export / "engines"
    options = B.BuildOptions(spatial=spatial_profiles(load_manifest(export).pixel_multiple, 64, 64, 64),
                             batch=Range(1, 1, 1), output=out, plugin="off", components=names)
    with pytest.raises(KeyboardInterrupt):
        B.build_all(export, options, log=lambda line: None)
    assert calls == names
    manifest = load_engine_manifest(out)
    assert list(manifest.components) == names[:1]
    first = manifest.components[names[0]]
    data = (out / first.engine).read_bytes()
    assert data == f"engine for {names[0]}".encode() and first.engine_sha256 == hashlib.sha256(data).hexdigest()
    assert json.loads((out / "engines.json").read_text())["plugin"]["enabled"] is False
    assert not (out / f"{names[1]}.plan").exists()
