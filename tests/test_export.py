import hashlib
import json

import onnx
import pytest
import torch

from linfusion import load_pipeline
from linfusion.export.cli import main as export_main
from linfusion.export.components import unet_component
from linfusion.export.exporter import ExportError, export_pipeline
from linfusion.export.parity import check_parity, compare_arrays
from linfusion.mount import self_attention_modules
from linfusion.runtime.manifest import load_manifest

PRESETS = ["tiny-sd", "tiny-sdxl"]
LAYOUT = {
    "tiny-sd": ["model_index.json", "linfusion.json", "scheduler/scheduler_config.json",
                "text_encoder/model.onnx", "unet/model.onnx", "vae_decoder/model.onnx",
                "vae_encoder/model.onnx", "tokenizer/tokenizer.json", "tokenizer/vocab.json",
                "tokenizer/merges.txt"],
}
LAYOUT["tiny-sdxl"] = LAYOUT["tiny-sd"] + ["text_encoder_2/model.onnx", "tokenizer_2/tokenizer.json"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("preset", PRESETS)
def test_export_directory_layout_and_manifest(exported, preset, precision):
    out = exported(preset, precision)
    for name in LAYOUT[preset]:
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".*partial*"))
    manifest = load_manifest(out)
    assert manifest.precision == precision and manifest.opset == 18
    assert manifest.pipeline.kind == ("sdxl" if "xl" in preset else "sd")
    assert manifest.pipeline.latent_multiple == 4 and manifest.pipeline.vae_scale_factor == 8
    assert all(result["passed"] for result in manifest.parity.values())
    # Checksums, recomputed independently; every file but the manifest is listed.
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"linfusion.json"}
    assert set(manifest.files) == on_disk
    for name, record in manifest.files.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == record["sha256"]
    unet = manifest.components["unet"]
    assert [t.name for t in unet.inputs][:3] == ["sample", "timestep", "encoder_hidden_states"]
    assert list(unet.input("sample").shape) == ["batch", 4, "height", "width"]
    assert unet.input("timestep").dtype == "float32"
    assert unet.outputs[0].name == "out_sample"
    if preset == "tiny-sdxl":
        assert manifest.pipeline.force_zeros_for_empty_prompt is True
        assert [t.name for t in unet.inputs][3:] == ["text_embeds", "time_ids"]
        assert [t.name for t in manifest.components["text_encoder_2"].outputs] == \
            ["last_hidden_state", "penultimate_hidden_state", "text_embeds"]
        # SD-XL's VAE has force_upcast: it stays fp32 in an fp16 export.
        assert manifest.components["vae_decoder"].precision == "fp32"
        assert manifest.components["vae_decoder"].inputs[0].dtype == "float32"
    assert unet.input("sample").dtype == ("float16" if precision == "fp16" else "float32")


@pytest.mark.parametrize("preset", PRESETS)
def test_one_linear_attention_node_per_attn1_named_after_its_module(exported, preset):
    model = onnx.load(str(exported(preset) / "unet" / "model.onnx"))
    nodes = [n for n in model.graph.node if n.op_type == "LinearAttention"]
    modules = self_attention_modules(load_pipeline(preset).pipeline.unet)
    assert sorted(n.name for n in nodes) == sorted(modules)
    for node in nodes:
        assert node.domain == "linfusion"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"linfusion" and attrs["plugin_version"] == b"1"
        assert attrs["heads"] == modules[node.name].heads and attrs["eps"] == pytest.approx(1e-4)
    assert [(f.domain, f.name) for f in model.functions] == [("linfusion", "LinearAttention")]
    assert {o.domain: o.version for o in model.opset_import}["linfusion"] == 1
    assert not any(n.metadata_props for n in model.graph.node)
    assert not any(n.doc_string for n in model.graph.node)


UNET_SIZES = [(1, 8, 8), (2, 12, 20), (2, 32, 16), (3, 40, 40)]


@pytest.mark.parametrize("preset", PRESETS)
def test_unet_matches_pytorch_at_many_sizes(exported, preset):
    """One artifact, every latent size that is a multiple of 4: square, non-square, batch 1-3."""
    out = exported(preset)
    loaded = load_pipeline(preset)
    component = unet_component(loaded.pipeline, loaded.is_xl, 4, torch.float32)
    for batch, h, w in UNET_SIZES:
        result = check_parity(component, out / "unet" / "model.onnx", "fp32", batch=batch, size=(h, w))
        assert result.passed, result.summary()


def test_fp16_unet_is_finite_at_a_256_latent(exported):
    """65536 tokens in the first attention level: where an fp16 token count overflows."""
    import onnxruntime as ort

    out = exported("tiny-sd", "fp16")
    loaded = load_pipeline("tiny-sd")  # the fp32 reference
    component = unet_component(loaded.pipeline, False, 4, torch.float32)
    inputs = component.make_inputs(1, 256, 256, torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = component.module(*inputs).numpy()
    session = ort.InferenceSession(str(out / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"sample": inputs[0].half().numpy(), "timestep": inputs[1].numpy(),
            "encoder_hidden_states": inputs[2].half().numpy()}
    got = session.run(None, feed)[0]
    parity = compare_arrays("out_sample", got, expected)
    assert parity.finite and parity.max_rel_error < 2e-2 and parity.cosine > 0.9999


def test_parity_catches_a_frozen_scale(exported, monkeypatch):
    """A model whose attention froze N at trace time must fail parity at another size."""
    import linfusion.attention as attention

    out = exported("tiny-sd")
    loaded = load_pipeline("tiny-sd")
    real = attention.linear_attention
    monkeypatch.setattr(attention, "linear_attention",
                        lambda q, k, v, heads, eps=1e-4: real(q, k, v, heads, eps) * (q.shape[1] / 96) ** 0.5)
    component = unet_component(loaded.pipeline, False, 4, torch.float32)
    assert not check_parity(component, out / "unet" / "model.onnx", "fp32", size=(8, 8)).passed


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    from linfusion.export import onnx_file

    def explode(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_file, "save", explode)
    with pytest.raises(ExportError, match="disk full"):
        export_pipeline(load_pipeline("tiny-sd"), tmp_path / "out", components=["vae_decoder"],
                        progress=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force_and_force_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ExportError, match="--force"):
        export_pipeline(load_pipeline("tiny-sd"), out, components=["vae_decoder"], progress=lambda line: None)
    assert (out / "keep.txt").exists()
    export_pipeline(load_pipeline("tiny-sd"), out, components=["vae_decoder"], force=True,
                    progress=lambda line: None)
    assert not (out / "keep.txt").exists() and (out / "vae_decoder" / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_large_models_use_external_data(tmp_path, monkeypatch):
    from linfusion.export import onnx_file

    monkeypatch.setattr(onnx_file, "EXTERNAL_DATA_THRESHOLD", 1024)
    manifest = export_pipeline(load_pipeline("tiny-sd"), tmp_path / "out", components=["vae_decoder"],
                               progress=lambda line: None)
    spec = manifest.components["vae_decoder"]
    assert spec.external_data == "vae_decoder/model.onnx_data"
    assert (tmp_path / "out" / spec.external_data).stat().st_size > 1_000_000
    assert (tmp_path / "out" / spec.path).stat().st_size < 1_000_000
    assert manifest.parity["vae_decoder"]["passed"]


@pytest.mark.parametrize("argv,message", [
    (["--model", "sd16"], "unknown model 'sd16'"),
    (["--model", "someone/uncached-model", "--offline"], "--random-weights"),
    (["--model", "tiny-sd", "--opset", "11"], "unsupported opset 11"),
    (["--model", "tiny-sd", "--components", "unet,vae"], "unknown component"),
])
def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, capsys, argv, message):
    code = export_main(argv + ["--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_checkpoint_that_does_not_fit(tmp_path, capsys):
    xl = load_pipeline("tiny-sdxl")
    xl.linfusion.save_pretrained(tmp_path / "xl-linfusion")
    code = export_main(["--model", "tiny-sd", "--linfusion", str(tmp_path / "xl-linfusion"),
                        "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "does not exist in this UNet" in err
    assert not (tmp_path / "out").exists()


def test_cli_existing_output(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert export_main(["--model", "tiny-sd", "--output", str(tmp_path / "out")]) != 0
    assert "--force" in capsys.readouterr().err


def test_cli_exports_with_progress(tmp_path, capsys):
    code = export_main(["--model", "tiny-sd", "--components", "text_encoder", "--output", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 0 and "[1/1] text_encoder" in out and "parity" in out and "done in" in out
    assert json.loads((tmp_path / "o" / "linfusion.json").read_text())["parity"]["text_encoder"]["passed"]


def test_tampered_export_is_detected(exported, tmp_path):
    import shutil

    from linfusion.runtime.manifest import ManifestError

    copy = tmp_path / "copy"
    shutil.copytree(exported("tiny-sd"), copy)
    with open(copy / "vae_decoder" / "model.onnx", "r+b") as f:
        f.seek(-10, 2)
        f.write(b"0123456789")
    with pytest.raises(ManifestError, match="checksum mismatch for vae_decoder/model.onnx"):
        load_manifest(copy)


def test_fixed_fp16_vae_is_exported_in_fp16(tmp_path):
    """SD-XL's VAE stays fp32 in fp16 exports, unless the user passes a VAE without force_upcast."""
    from diffusers import AutoencoderKL

    from linfusion.export.exporter import PRECISIONS
    from linfusion.presets import get_preset

    config = {**get_preset("tiny-sdxl").read_config("vae", "config.json"), "force_upcast": False}
    torch.manual_seed(0)
    AutoencoderKL.from_config(config).save_pretrained(tmp_path / "fixed-vae", safe_serialization=True)
    loaded = load_pipeline("tiny-sdxl", dtype=PRECISIONS["fp16"], vae=str(tmp_path / "fixed-vae"))
    manifest = export_pipeline(loaded, tmp_path / "out", "fp16", components=["vae_decoder"],
                               progress=lambda line: None)
    assert manifest.components["vae_decoder"].precision == "fp16"
    assert manifest.source["vae"] == str(tmp_path / "fixed-vae")
