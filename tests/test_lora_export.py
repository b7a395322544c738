"""LoRA at export: linfusion-export --lora fuses through diffusers and records it; the runtime's hot-swap of
the same LoRAs on a plain export gives the same UNet and text encoder outputs (max rel <= 1e-5, fp32)."""

import hashlib
import json

import numpy as np
import pytest
from test_lora_files import make_peft_lora, write_kohya

from linfusion import load_pipeline


@pytest.mark.slow
def test_export_time_fusion_equals_hot_swap(exported, tmp_path):
    import onnxruntime as ort
    from linfusion.export.cli import main
    from linfusion.runtime import Pipeline
    from linfusion.runtime.manifest import load_manifest

    first = make_peft_lora("tiny-sd", tmp_path / "a", seed=5)
    second = make_peft_lora("tiny-sd", tmp_path / "b", seed=6, text=False)
    out = tmp_path / "fused"
    assert main(["--model", "tiny-sd", "--output", str(out), "--components", "text_encoder,unet", "--skip-parity",
                 "--lora", f"{first}:0.7", "--lora", f"{second}:-0.4"]) == 0
    records = load_manifest(out).loras
    assert [(r["file"], r["scale"], r["applied"]) for r in records] == [
        ("pytorch_lora_weights.safetensors", 0.7, {"unet": 70, "text_encoder": 9}),
        ("pytorch_lora_weights.safetensors", -0.4, {"unet": 70})]
    assert records[0]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert records[0]["linfusion_projections"] == 4 * 7 and "LinFusion's attn1 projections" in records[0]["summary"]

    hot = Pipeline.from_export(exported("tiny-sd"), backend="onnxruntime", loras=[(first, 0.7), (second, -0.4)])
    rng = np.random.default_rng(2)
    feeds = {"sample": rng.standard_normal((2, 4, 16, 8)).astype(np.float32),
             "timestep": np.array([900.0, 10.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}
    ids = {"input_ids": rng.integers(0, 1000, (2, 77))}
    for name, inputs in (("unet", feeds), ("text_encoder", ids)):
        fused = ort.InferenceSession(str(out / name / "model.onnx"), providers=["CPUExecutionProvider"])
        theirs, ours = fused.run(None, inputs)[0], hot.runners[name].run(inputs)[hot.runners[name].output_names[0]]
        assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max(), name
        # and the LoRAs matter: the plain export is far off
        plain = ort.InferenceSession(str(exported("tiny-sd") / name / "model.onnx"), providers=["CPUExecutionProvider"])
        assert np.abs(plain.run(None, inputs)[0] - theirs).max() > 0.01 * np.abs(theirs).max(), name


def test_export_reports_what_diffusers_cannot_place(tmp_path):
    """kohya text-encoder attention keys, which diffusers drops here (test_lora_files), are counted."""
    from linfusion.export.lora import fuse_loras

    kohya = write_kohya(make_peft_lora("tiny-sd", tmp_path, seed=7), tmp_path / "k.safetensors")
    lines = []
    records = fuse_loras(load_pipeline("tiny-sd").pipeline, [(kohya, 1.0)], lines.append)
    assert records[0]["applied"] == {"unet": 70, "text_encoder": 3} and records[0]["unplaced"] == 6
    assert len(lines) == 1 and "6 modules diffusers could not place, dropped (first: text_encoder." in lines[0]
    json.dumps(records)


@pytest.mark.parametrize("case", ["pickle", "scale", "architecture"])
def test_export_refuses_bad_loras_before_tracing(tmp_path, capsys, case):
    from linfusion.export.cli import main
    from safetensors.numpy import save_file

    out = tmp_path / "never"
    if case == "pickle":
        (tmp_path / "x.bin").write_bytes(b"\x80\x04junk")
        arg, words = str(tmp_path / "x.bin"), "pickle"
    elif case == "scale":
        save_file({"unet.a.lora_A.weight": np.ones((1, 2), np.float32),
                   "unet.a.lora_B.weight": np.ones((2, 1), np.float32)}, str(tmp_path / "s.safetensors"))
        arg, words = f"{tmp_path / 's.safetensors'}:inf", "must be a finite number"
    else:
        path = make_peft_lora("tiny-sdxl", tmp_path, text=False)  # SD-XL's UNet LoRA on SD's UNet
        arg, words = str(path), "another architecture"
    assert main(["--model", "tiny-sd", "--output", str(out), "--lora", arg]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and not out.exists()
