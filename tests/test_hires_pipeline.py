"""The hires chain and the export's size limits wired into Pipeline and linfusion-generate."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from linfusion.runtime import Pipeline
from linfusion.runtime import cli as generate_cli
from linfusion.runtime.hires import Hires, resolve_hires, stages
from linfusion.runtime.manifest import MANIFEST_NAME, load_manifest
from linfusion.runtime.request import GenerationError, GenerationRequest
from test_hires import PROMPT, diffusers_chain, psnr


@pytest.fixture(scope="module")
def tiny(exported):
    return Pipeline.from_export(exported("tiny-sdxl"), backend="onnxruntime")


def test_pipeline_call_with_hires_matches_the_diffusers_chain(tiny):
    """``pipe(..., hires=...)`` is the chain: the diffusers chain's image, a timing record per stage."""
    hires = Hires(base=(64, 96), strengths=(0.5, 0.3))
    steps = []
    out = tiny(PROMPT, width=256, height=384, num_inference_steps=10, guidance_scale=5.0, seed=11,
               output_type="np", tile_vae=False, hires=hires,
               callback=lambda stage, step, total: steps.append(stage))
    chain = stages(hires, 256, 384, 10, tiny.facts.default_size, tiny.facts.pixel_multiple)
    theirs = diffusers_chain("tiny-sdxl", chain, None, 11, 5.0)
    assert out.images.shape == (1, 384, 256, 3)
    assert psnr(out.images[0], theirs) >= 40
    assert [(r["width"], r["height"]) for r in out.timings["stages"]] == [(64, 96), (128, 192), (256, 384)]
    assert steps == [0] * 10 + [1] * 5 + [2] * 3  # (stage, step, total), int(10 * s) steps


def test_hires_off_and_none_are_one_pass(tiny):
    request = GenerationRequest(PROMPT, width=256, height=256, num_inference_steps=2, seed=3, output_type="np")
    one = tiny.generate(request)
    off = tiny.generate(replace(request, hires="off"))
    assert "stages" not in one.timings and np.array_equal(one.images, off.images)


def test_auto_applies_to_one_image_from_text_only():
    text = GenerationRequest(PROMPT, width=4096, height=2048, hires="auto")
    assert resolve_hires(text) == Hires()
    assert resolve_hires(replace(text, hires=None)) is None and resolve_hires(replace(text, hires="off")) is None
    # auto at its defaults leaves img2img, given latents and several images to one pass ...
    for other in (replace(text, image="x.png"), replace(text, latents=np.zeros(1)),
                  replace(text, num_images_per_prompt=2), replace(text, prompt=["a", "b"])):
        assert resolve_hires(other) is None
    # ... but explicit stages are kept, for plan_stages to refuse with one line.
    explicit = replace(text, image="x.png", hires=Hires(base=(1024, 512)))
    assert resolve_hires(explicit) == Hires(base=(1024, 512))
    with pytest.raises(GenerationError, match="hires must be"):
        resolve_hires(replace(text, hires=3))


def test_cli_prints_a_line_per_stage(exported, tmp_path, capsys):
    out = tmp_path / "wide.png"
    code = generate_cli.main([str(exported("tiny-sd")), "--prompt", PROMPT, "--width", "512", "--height", "256",
                              "--steps", "4", "--seed", "1", "--hires-strengths", "0.5", "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert any(line.startswith("stage 0: 256x128 text-to-image") for line in lines), lines
    assert any(line.startswith("stage 1: 512x256 img2img 0.5") for line in lines), lines
    from PIL import Image

    assert Image.open(out).size == (512, 256)


@pytest.mark.parametrize("args, words", [
    (["--hires-base", "1024x1024"], "larger than the target"),
    (["--hires-strengths", "0.4,1.5"], "must be in (0, 1]"),
    (["--hires-strengths", ""], "zero upscale stages"),
    (["--hires-base", "192x192"], "power of two"),
])
def test_cli_refuses_bad_hires_before_loading(exported, tmp_path, capsys, monkeypatch, args, words):
    def no_loading(*a, **k):
        raise AssertionError("the models loaded")

    monkeypatch.setattr(Pipeline, "from_export", no_loading)
    code = generate_cli.main([str(exported("tiny-sd")), "--prompt", "x", "--width", "512", "--height", "512",
                              "--output", str(tmp_path / "o.png"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and "\n" not in err, err


@pytest.fixture(scope="module")
def limited(exported, tmp_path_factory):
    """The tiny-sd export with smaller recorded limits: max 256x256, batch 2 up to 128x128."""
    folder = tmp_path_factory.mktemp("limited") / "tiny-sd"
    shutil.copytree(exported("tiny-sd"), folder)
    manifest = load_manifest(folder)
    facts = replace(manifest.pipeline, max_size=(256, 256), max_batch2_size=(128, 128), tensor_limit=10**6)
    (folder / MANIFEST_NAME).write_text(replace(manifest, pipeline=facts).to_json())
    assert json.loads((folder / MANIFEST_NAME).read_text())["pipeline"]["max_size"] == [256, 256]
    return folder


def test_pipeline_applies_the_export_limits(limited, capsys, tmp_path):
    pipe = Pipeline.from_export(limited, backend="onnxruntime")
    with pytest.raises(GenerationError, match="512x512 is beyond this export's maximum size 256x256"):
        pipe.plan(GenerationRequest("x", width=512, height=512))
    assert pipe.plan(GenerationRequest("x", width=128, height=128, guidance_scale=5.0)).cfg_mode == "batched"
    assert pipe.plan(GenerationRequest("x", width=256, height=256, guidance_scale=5.0)).cfg_mode == "sequential"
    with pytest.raises(GenerationError, match="at most 1 at a time"):  # 2 x 256^2 > 2 x 128^2 pixels
        pipe.plan(GenerationRequest("x", width=256, height=256, num_images_per_prompt=2))
    code = generate_cli.main([str(limited), "--prompt", "x", "--width", "512", "--height", "512", "--hires", "off",
                              "--output", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "beyond this export's maximum size" in err and "\n" not in err
