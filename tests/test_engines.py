"""linfusion-build's pure logic on the CPU: profiles, engines.json, the ONNX rewrite, the CLI."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from linfusion.engines import onnx_prep as P
from linfusion.runtime.contract import ops
from linfusion.engines.cli import main
from linfusion.engines.profiles import (
    ProfileError,
    Range,
    component_profiles,
    parse_batch,
    parse_sizes,
    spatial_profiles,
    split_side_range,
)
from linfusion.runtime.engine_manifest import (
    EngineManifest,
    EngineManifestError,
    EngineSpec,
    ProfileSpec,
    load_engine_manifest,
)
from linfusion.runtime.manifest import load_manifest

# --- profiles -----------------------------------------------------------------------------------


def test_parse_batch_and_sizes():
    assert parse_batch("1:2:4") == Range(1, 2, 4)
    assert parse_batch("3") == Range(3, 3, 3)
    for bad in ("1:2", "a:b:c", "4:2:1", "0:1:1"):
        with pytest.raises(ProfileError):
            parse_batch(bad)
    assert parse_sizes("1024x768, 512X512") == [(1024, 768), (512, 512)]
    for bad in ("", "1024", "0x5", "axb"):
        with pytest.raises(ProfileError):
            parse_sizes(bad)


def test_side_range_split_into_profiles_at_most_twice_as_wide():
    assert split_side_range(Range(512, 768, 1024), 64) == [Range(512, 768, 1024)]
    pieces = split_side_range(Range(512, 1024, 2048), 64)
    assert [(p.min, p.max) for p in pieces] == [(512, 1024), (1024, 2048)]
    assert pieces[0].opt == 1024
    wide = split_side_range(Range(256, 512, 4096), 64)
    assert wide[0].min == 256 and wide[-1].max == 4096
    assert all(p.max / p.min <= 2.0 + 1e-9 and p.min <= p.opt <= p.max and p.opt % 64 == 0 for p in wide)
    assert all(a.max == b.min for a, b in zip(wide, wide[1:]))
    with pytest.raises(ProfileError, match="multiple of 64"):
        split_side_range(Range(500, 1024, 2048), 64)


@pytest.fixture(scope="module")
def sd_export(exported):
    return exported("tiny-sd")


def test_component_profiles_follow_the_manifest(sd_export):
    manifest = load_manifest(sd_export)
    multiple = manifest.pixel_multiple
    spatial = spatial_profiles(multiple, 128, 256, 512)
    batch = Range(1, 1, 4)
    unet = component_profiles(manifest, "unet", spatial, batch)
    assert len(unet) == 2
    low, opt, high = unet[0].shapes["sample"]
    factor = manifest.pipeline.vae_scale_factor
    assert low == [1, 4, 128 // factor, 128 // factor] and high[0] == 8  # CFG doubles the batch
    assert opt[0] == 2 and unet[1].shapes["sample"][2][2:] == [512 // factor] * 2
    assert unet[1].shapes["sample"][0][2:] == [128 // factor] * 2, "nested: 512x128 must fit a profile"
    assert unet[0].shapes["encoder_hidden_states"][0][1:] == list(manifest.components["unet"].input(
        "encoder_hidden_states").shape[1:])
    text = component_profiles(manifest, "text_encoder", spatial, batch)
    assert len(text) == 1 and text[0].shapes["input_ids"] == [[1, 77], [2, 77], [8, 77]]
    vae = component_profiles(manifest, "vae_decoder", spatial, batch)
    assert vae[0].shapes["latent_sample"][2] == [4, 4, 256 // factor, 256 // factor]
    enc = component_profiles(manifest, "vae_encoder", spatial, batch)
    assert enc[1].shapes["sample"][2] == [4, 3, 512, 512]
    static = component_profiles(manifest, "unet", spatial_profiles(multiple, sizes=[(256, 128)]), batch)
    assert static[0].shapes["sample"][0][2:] == static[0].shapes["sample"][2][2:] == [128 // factor, 256 // factor]


@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sdxl"])
def test_every_dynamic_input_has_a_range(exported, preset):
    """What linfusion-build's add_profiles demands of each profile, on real manifests."""
    manifest = load_manifest(exported(preset))
    spatial = spatial_profiles(manifest.pixel_multiple, 128, 256, 512)
    for name, component in manifest.components.items():
        for profile in component_profiles(manifest, name, spatial, Range(1, 1, 4)):
            dynamic = {t.name for t in component.inputs if any(isinstance(s, str) for s in t.shape)}
            assert dynamic <= set(profile.shapes) <= {t.name for t in component.inputs}, name


# --- engines.json -------------------------------------------------------------------------------

def _manifest() -> EngineManifest:
    profile = ProfileSpec({"sample": [[1, 4, 64, 64], [2, 4, 128, 128], [8, 4, 128, 128]]})
    spec = EngineSpec(engine="unet.plan", engine_sha256="0" * 64, onnx="unet/model.onnx", onnx_sha256="1" * 64,
                      precision="fp16", profiles=[profile], plugin=True, linear_attention_nodes=16)
    return EngineManifest(tensorrt_version="10.13.0.35", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                          components={"unet": spec}, plugin={"names": ["linfusion::LinearAttentionState"],
                                                             "version": "1", "enabled": True})


def test_engine_manifest_round_trip(tmp_path):
    manifest = _manifest()
    (tmp_path / "engines.json").write_text(manifest.to_json())
    loaded = load_engine_manifest(tmp_path)
    assert loaded == manifest
    data = json.loads(manifest.to_json())
    assert data["tensorrt_version"] == "10.13.0.35" and data["compute_capability"] == "9.0"
    assert data["components"]["unet"]["onnx_sha256"] == "1" * 64 and data["plugin"]["enabled"] is True
    spec = loaded.components["unet"]
    assert spec.profile_index({"sample": (2, 4, 96, 64)}) == 0
    assert spec.profile_index({"sample": (9, 4, 96, 64)}) is None
    assert spec.profile_index({"sample": (1, 4, 32, 64)}) is None


def test_engine_manifest_refuses_other_tensorrt_or_gpu():
    manifest = _manifest()
    manifest.check_compatible("10.13.0.99", "NVIDIA H100 80GB HBM3", "9.0")  # build number ignored
    with pytest.raises(EngineManifestError, match=r"built with TensorRT 10\.13\.0\.35, but TensorRT 10\.14\.1"):
        manifest.check_compatible("10.14.1", "NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(EngineManifestError, match=r"built for NVIDIA H100 80GB HBM3 .*this GPU is NVIDIA L4"):
        manifest.check_compatible("10.13.0.35", "NVIDIA L4", "8.9")


def test_engine_manifest_errors(tmp_path):
    with pytest.raises(EngineManifestError, match="linfusion-build"):
        load_engine_manifest(tmp_path)
    (tmp_path / "engines.json").write_text("{")
    with pytest.raises(EngineManifestError, match="corrupt"):
        load_engine_manifest(tmp_path)
    data = json.loads(_manifest().to_json())
    data["format_version"] = 99
    (tmp_path / "engines.json").write_text(json.dumps(data))
    with pytest.raises(EngineManifestError, match="version 99"):
        load_engine_manifest(tmp_path)
    (tmp_path / "engines.json").write_text(_manifest().to_json())
    with pytest.raises(EngineManifestError, match="missing"):
        load_engine_manifest(tmp_path, verify=True)
    (tmp_path / "unet.plan").write_bytes(b"x")
    with pytest.raises(EngineManifestError, match="checksum"):
        load_engine_manifest(tmp_path, verify=True)


# --- CLI without TensorRT -----------------------------------------------------------------------

def test_cli_without_tensorrt_exits_with_one_line(sd_export, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if not installed, even where it is
    assert main([str(sd_export), "--output", str(sd_export / "engines-test")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "TensorRT is not installed" in err
    assert not (sd_export / "engines-test").exists()


def test_cli_rejects_bad_arguments(sd_export, capsys, tmp_path):
    assert main([str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([str(sd_export), "--sizes", "100x100"]) == 2
    assert "multiple of" in capsys.readouterr().err
    assert main([str(sd_export), "--batch", "4:1:1"]) == 2
    with pytest.raises(SystemExit):
        main([str(sd_export), "--plugin", "maybe"])


# --- ONNX preparation ---------------------------------------------------------------------------

def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_export_nodes_carry_plugin_attributes(exported, precision):
    model = onnx.load(str(exported("tiny-sd", precision) / "unet" / "model.onnx"))
    nodes = P.attention_nodes(model)
    assert nodes
    for node in nodes:
        attrs = _attrs(node)
        assert attrs["plugin_namespace"] == b"linfusion" and attrs["plugin_version"] == b"1"
        assert attrs["heads"] > 0 and attrs["eps"] > 0


def test_rewrite_makes_the_plugin_triple(sd_export):
    model = onnx.load(str(sd_export / "unet" / "model.onnx"))
    originals = {n.output[0]: (list(n.input), _attrs(n)) for n in P.attention_nodes(model)}
    assert P.rewrite_to_plugins(model) == len(originals)
    assert not P.attention_nodes(model)
    by_output = {o: n for n in model.graph.node for o in n.output}
    for out, ((q, k, v), attrs) in originals.items():
        apply = by_output[out]
        assert (apply.domain, apply.op_type) == ("linfusion", "LinearAttentionApply") and apply.input[0] == q
        reduce = by_output[apply.input[1]]
        assert reduce.op_type == "LinearAttentionReduce"
        state = by_output[reduce.input[0]]
        assert state.op_type == "LinearAttentionState" and list(state.input) == [k, v]
        for node in (state, reduce, apply):
            a = _attrs(node)
            assert a["plugin_namespace"] == b"linfusion" and a["plugin_version"] == b"1" and a["aot"] == 1
        assert _attrs(state)["heads"] == _attrs(apply)["heads"] == attrs["heads"]
        assert _attrs(apply)["eps"] == pytest.approx(attrs["eps"])
    # topological order kept: every input is produced before it is used
    seen = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    for node in model.graph.node:
        assert all(i in seen for i in node.input), node.name
        seen.update(node.output)


def _run_ort(model_or_path, feed):
    import onnxruntime as ort

    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


@pytest.mark.parametrize("precision,size,batch", [("fp32", (96, 160), 2), ("fp32", (128, 128), 1),
                                                  ("fp16", (160, 96), 2)])
def test_rewritten_graph_matches_the_export(exported, precision, size, batch):
    """The State/Reduce/Apply wiring, given reference semantics as ONNX functions, in ORT."""
    directory = exported("tiny-sd", precision)
    manifest = load_manifest(directory)
    path = directory / "unet" / "model.onnx"
    model = onnx.load(str(path))
    P.rewrite_to_plugins(model)
    P.with_reference_functions(model)
    onnx.checker.check_model(model)
    spec = manifest.components["unet"]
    dtype = np.dtype(spec.input("sample").dtype)
    rng = np.random.default_rng(3)
    factor = manifest.pipeline.vae_scale_factor
    hidden = spec.input("encoder_hidden_states").shape
    feed = {"sample": rng.standard_normal((batch, 4, size[0] // factor, size[1] // factor)).astype(dtype),
            "timestep": np.array([10.0, 700.0][:batch], np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, hidden[1], hidden[2])).astype(dtype)}
    want = _run_ort(path, feed).astype(np.float64)
    got = _run_ort(model, feed).astype(np.float64)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= (1e-5 if precision == "fp32" else 5e-3), err


def test_rewrite_reference_function_catches_a_wrong_wiring(sd_export):
    """The ORT comparison above can fail: swap k and v in one State node and it does."""
    path = sd_export / "unet" / "model.onnx"
    model = onnx.load(str(path))
    P.rewrite_to_plugins(model)
    state = next(n for n in model.graph.node if n.op_type == "LinearAttentionState")
    state.input[0], state.input[1] = state.input[1], state.input[0]
    P.with_reference_functions(model)
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((1, 4, 16, 16)).astype(np.float32),
            "timestep": np.array([10.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 32)).astype(np.float32)}
    want, got = _run_ort(path, feed), _run_ort(model, feed)
    assert np.abs(got - want).max() / np.abs(want).max() > 1e-3


def test_prepare_writes_a_copy_and_leaves_the_export_alone(sd_export, tmp_path):
    source = sd_export / "unet" / "model.onnx"
    before = source.read_bytes()
    on = P.prepare(source, tmp_path / "on" / "model.onnx", plugin=True)
    off = P.prepare(source, tmp_path / "off" / "model.onnx", plugin=False)
    assert source.read_bytes() == before
    assert on.attention_nodes == off.attention_nodes == len(on.heads) > 0
    on_model, off_model = onnx.load(str(on.path)), onnx.load(str(off.path))
    assert {n.op_type for n in on_model.graph.node if n.domain == "linfusion"} == set(ops.PLUGIN_OPS)
    assert not any(f.name in ops.PLUGIN_OPS for f in on_model.functions), "TensorRT must not inline the plugins"
    for node in P.attention_nodes(off_model):
        assert "plugin_namespace" not in _attrs(node) and "heads" in _attrs(node)
    assert any(f.name == "LinearAttention" for f in off_model.functions)
