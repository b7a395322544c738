"""Every bad request gets one clear line and a non-zero exit, before any heavy work."""

import json
import shutil

import numpy as np
import pytest

from linfusion.runtime.cli import main


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def export_dir(exported):
    return str(exported("tiny-sd"))


@pytest.mark.parametrize("extra,message", [
    (["--height", "100", "--width", "64"], "multiples of 32"),
    (["--scheduler", "pndm_fast"], "unknown scheduler 'pndm_fast'"),
    (["--steps", "0"], "at least 1"),
    (["--init-image", "IMG", "--strength", "1.5"], "strength must be in (0, 1]"),
    (["--init-image", "IMG", "--strength", "0"], "strength must be in (0, 1]"),
    (["--init-image", "NOT_AN_IMAGE"], "cannot read init image"),
    (["--latents", "LATENTS", "--height", "64", "--width", "64"], "latents have shape (1, 4, 4, 4)"),
    (["--latents", "/no/such.npy"], "cannot read latents"),
])
def test_bad_requests(export_dir, tmp_path, capsys, extra, message):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "img.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    np.save(tmp_path / "lat.npy", np.zeros((1, 4, 4, 4), np.float32))
    replace = {"IMG": str(tmp_path / "img.png"), "NOT_AN_IMAGE": str(tmp_path / "bad.png"),
               "LATENTS": str(tmp_path / "lat.npy")}
    extra = [replace.get(a, a) for a in extra]
    code, err = run_cli([export_dir, "--prompt", "x", "--output", str(tmp_path / "o.png")] + extra, capsys)
    assert code != 0 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.png").exists()


def test_missing_and_corrupt_export_directories(exported, tmp_path, capsys):
    code, err = run_cli([str(tmp_path / "nothing"), "--prompt", "x"], capsys)
    assert code != 0 and "export directory not found" in err
    (tmp_path / "empty").mkdir()
    code, err = run_cli([str(tmp_path / "empty"), "--prompt", "x"], capsys)
    assert code != 0 and "no linfusion.json" in err
    broken = tmp_path / "broken"
    shutil.copytree(exported("tiny-sd"), broken)
    (broken / "linfusion.json").write_text("{truncated")
    code, err = run_cli([str(broken), "--prompt", "x"], capsys)
    assert code != 0 and "corrupt" in err and len(err.splitlines()) == 1
    original = (exported("tiny-sd") / "linfusion.json").read_text()
    manifest = json.loads(original)
    manifest["format_version"] = 99
    (broken / "linfusion.json").write_text(json.dumps(manifest))
    code, err = run_cli([str(broken), "--prompt", "x"], capsys)
    assert code != 0 and "format version 99" in err
    (broken / "linfusion.json").write_text(original)
    (broken / "unet" / "model.onnx").write_bytes(b"garbage")
    code, err = run_cli([str(broken), "--prompt", "x"], capsys)
    assert code != 0 and "checksum mismatch for unet/model.onnx" in err


def test_cli_writes_images_and_a_timing_summary(exported, tmp_path, capsys):
    code = main([str(exported("tiny-sd")), "--prompt", "a boat", "--steps", "2", "--height", "64",
                 "--width", "64", "--num-images", "2", "--output", str(tmp_path / "boat.png")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (tmp_path / "boat_0.png").is_file() and (tmp_path / "boat_1.png").is_file()
    assert "UNet" in captured.out and "s/step" in captured.out and "decode" in captured.out
    assert "denoising" in captured.err


def test_exports_missing_components(exported, tmp_path, capsys):
    from PIL import Image

    from dataclasses import replace

    from linfusion.runtime.manifest import Manifest

    def without(manifest: Manifest, name: str) -> Manifest:
        """What an export with --components writes (the manifest's own checksum included)."""
        components = dict(manifest.components)
        del components[name]
        return replace(manifest, components=components)

    copy = tmp_path / "partial"
    shutil.copytree(exported("tiny-sd"), copy)
    manifest = without(Manifest.from_dict(json.loads((copy / "linfusion.json").read_text())), "vae_encoder")
    (copy / "linfusion.json").write_text(manifest.to_json())
    Image.new("RGB", (64, 64)).save(tmp_path / "img.png")
    code, err = run_cli([str(copy), "--prompt", "x", "--init-image", str(tmp_path / "img.png")], capsys)
    assert code != 0 and "no vae_encoder" in err
    (copy / "linfusion.json").write_text(without(manifest, "vae_decoder").to_json())
    code, err = run_cli([str(copy), "--prompt", "x"], capsys)
    assert code != 0 and "lacks vae_decoder" in err


def test_vae_encoder_loads_on_first_img2img(exported):
    from PIL import Image

    from linfusion.runtime import Pipeline

    pipe = Pipeline.from_export(exported("tiny-sd"))
    assert "vae_encoder" not in pipe.runners
    pipe("x", height=64, width=64, num_inference_steps=1, output_type="np")
    assert "vae_encoder" not in pipe.runners
    pipe("x", image=Image.new("RGB", (64, 64)), strength=0.5, num_inference_steps=2, output_type="np")
    assert "vae_encoder" in pipe.runners
