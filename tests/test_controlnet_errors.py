"""ControlNet arguments: the checks made before any model runs, the control image's preprocessing
against diffusers' own processor, the per-step schedule, and the residual layout against diffusers."""

import math
import re
import shutil
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from linfusion.runtime.contract import ComponentSpec, Residuals, TensorSpec
from linfusion.runtime.controlnet import ControlPlan, plan_control
from linfusion.runtime.request import GenerationError, GenerationRequest
from PIL import Image


def fake_manifest(controlnets=1, multiple=32):
    spec = ComponentSpec("controlnet", "controlnet/model.onnx", "fp32", (TensorSpec("sample", "float32", (1,)),), ())
    names = ["controlnet"] if controlnets == 1 else [f"controlnet_{i}" for i in range(controlnets)]
    return SimpleNamespace(components={name: spec for name in names}, pixel_multiple=multiple)


def image(width=120, height=80, seed=0):
    pixels = np.random.default_rng(seed).random((height, width, 3))
    return Image.fromarray((pixels * 255).astype(np.uint8))


def request(**kwargs):
    return GenerationRequest("a fox", control_image=kwargs.pop("control_image", image()), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"controlnet_conditioning_scale": float("nan")}, "controlnet_conditioning_scale must be a finite number"),
    ({"controlnet_conditioning_scale": math.inf}, "controlnet_conditioning_scale must be a finite number"),
    ({"controlnet_conditioning_scale": "strong"}, "controlnet_conditioning_scale must be a number"),
    ({"control_guidance_start": -0.1}, r"control_guidance_start must be in \[0, 1\]"),
    ({"control_guidance_end": 1.5}, r"control_guidance_end must be in \[0, 1\]"),
    ({"control_guidance_start": 0.5, "control_guidance_end": 0.5}, "must be below control_guidance_end"),
    ({"control_guidance_start": 0.9, "control_guidance_end": 0.1}, "must be below control_guidance_end"),
    ({"control_image": [image(), image()]}, "2 control image"),
    ({"controlnet_conditioning_scale": [1.0, 0.5]}, "2 values for 1 ControlNets"),
    ({"image": image()}, r"\(ControlNet img2img\) is not supported"),
    ({"control_image": "/nonexistent/edges.png"}, "cannot read control image"),
    ({"control_image": 3}, "must be a path or a PIL image"),
])
def test_bad_control_arguments_are_one_line(kwargs, message):
    with pytest.raises(GenerationError, match=message) as info:
        plan_control(request(**kwargs), fake_manifest(), 64, 96, 1)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end"])
def test_control_settings_without_a_control_image_are_refused(name):
    with pytest.raises(GenerationError, match=f"{name} is only used with control_image"):
        plan_control(GenerationRequest("a fox", **{name: 0.5}), fake_manifest(), None, None, 1)


def test_an_export_without_controlnet_names_the_remedy():
    with pytest.raises(GenerationError, match="no ControlNet.*linfusion-export --controlnet"):
        plan_control(request(), fake_manifest(controlnets=0), None, None, 1)


def test_control_image_is_preprocessed_like_diffusers():
    """Resized (LANCZOS) to the request's size, [0, 1], repeated to the batch: diffusers' control
    image processor (VaeImageProcessor without normalisation) is the reference."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    source = image(130, 70, seed=5)
    plan, height, width = plan_control(request(control_image=source), fake_manifest(), 64, 96, 3)
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    theirs = processor.preprocess(source, height=64, width=96).to(torch.float32).numpy()
    assert (height, width) == (64, 96)
    assert plan.images[0].shape == (3, 3, 64, 96)
    np.testing.assert_allclose(plan.images[0], np.repeat(theirs, 3, axis=0), atol=1e-6)
    assert plan.image(0, 6).shape == (6, 3, 64, 96)  # batched classifier-free guidance doubles it


def test_the_control_image_sets_the_size_when_the_request_does_not():
    """Like diffusers (its size, rounded down), but to the export's pixel multiple, not the VAE factor."""
    _, height, width = plan_control(request(control_image=image(130, 70)), fake_manifest(multiple=32), None, None, 1)
    assert (height, width) == (64, 128)
    with pytest.raises(GenerationError, match="smaller than 32 px"):
        plan_control(request(control_image=image(20, 70)), fake_manifest(multiple=32), None, None, 1)


def test_guidance_window_by_hand():
    """10 steps, start 0.2, end 0.8: step i runs unless i/10 < 0.2 or (i+1)/10 > 0.8, so steps 2..7."""
    plan = ControlPlan(["controlnet"], [np.zeros((1, 3, 8, 8), np.float32)], [0.5], [0.2], [0.8], steps=10)
    scales = []
    for step in range(10):
        plan.step = step
        scales.append(plan.step_scales()[0])
    assert scales == [0.0, 0.0] + [0.5] * 6 + [0.0, 0.0]


def test_several_controlnets_take_one_value_or_one_each():
    plan, _, _ = plan_control(request(control_image=[image(), image(seed=1)], controlnet_conditioning_scale=[0.3, 2.0],
                                      control_guidance_end=0.5), fake_manifest(controlnets=2), 64, 96, 1)
    assert plan.names == ["controlnet_0", "controlnet_1"]
    assert plan.scales == [0.3, 2.0] and plan.starts == [0.0, 0.0] and plan.ends == [0.5, 0.5]


@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sdxl"])
def test_residual_layout_matches_diffusers_controlnet_outputs(preset):
    """The contract's residual specs against the shapes diffusers' ControlNet actually returns."""
    import torch
    from linfusion.export.controlnet import random_controlnet

    from linfusion import load_pipeline

    pipe = load_pipeline(preset).pipeline
    unet = pipe.unet
    residuals = Residuals.of_unet(unet.config.block_out_channels, unet.config.layers_per_block)
    controlnet = random_controlnet(unet, 8, seed=0)
    added = None
    if preset == "tiny-sdxl":
        pooled = pipe.text_encoder_2.config.projection_dim
        added = {"text_embeds": torch.zeros(1, pooled), "time_ids": torch.zeros(1, 6)}
    with torch.no_grad():
        down, mid = controlnet(torch.zeros(1, 4, 16, 24), torch.tensor([10.0]),
                               torch.zeros(1, 77, unet.config.cross_attention_dim), torch.zeros(1, 3, 128, 192),
                               added_cond_kwargs=added, return_dict=False)
    got = [(t.shape[1], 16 // t.shape[2]) for t in (*down, mid)]
    assert got == [*residuals.down, residuals.mid]
    assert all(float(t.abs().max()) > 0 for t in (*down, mid))  # the zero convolutions were randomised


@pytest.fixture
def controlnet_export_dir(exported, tmp_path):
    """A plain tiny-sd export whose manifest also lists a ControlNet (enough for checks that read only
    the manifest; no model behind it)."""
    from linfusion.runtime.manifest import MANIFEST_NAME, load_manifest

    folder = tmp_path / "with-controlnet"
    shutil.copytree(exported("tiny-sd"), folder)
    manifest = load_manifest(folder, verify=False)
    unet = manifest.components["unet"]
    fake = replace(unet, kind="controlnet", path="controlnet/model.onnx")
    manifest = replace(manifest, components={**manifest.components, "controlnet": fake})
    (folder / MANIFEST_NAME).write_text(manifest.to_json())
    return folder


def _cli(monkeypatch, capsys, argv):
    from linfusion.runtime import cli
    from linfusion.runtime.pipeline import Pipeline

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Pipeline, "from_export", never)
    code = cli.main(argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("flags, message", [
    (["--control-scale", "nan"], "--control-scale must be a finite number"),
    (["--control-start", "0.6", "--control-end", "0.4"], r"--control-start \(0.6\) must be below --control-end"),
    (["--control-end", "2"], r"--control-end must be in \[0, 1\]"),
    (["--control-image", "EDGES"], "2 --control-image"),
])
def test_cli_refuses_bad_control_flags_before_loading(monkeypatch, capsys, tmp_path, controlnet_export_dir,
                                                      flags, message):
    edges = tmp_path / "edges.png"
    image().save(edges)
    flags = [str(edges) if f == "EDGES" else f for f in flags]
    code, err = _cli(monkeypatch, capsys, [str(controlnet_export_dir), "--prompt", "x", "--control-image",
                                          str(edges), *flags, "--output", str(tmp_path / "o.png")])
    assert code == 2 and len(err.splitlines()) == 1
    assert re.search(message, err), err


def test_cli_control_image_on_an_export_without_controlnet(monkeypatch, capsys, tmp_path, exported):
    edges = tmp_path / "edges.png"
    image().save(edges)
    code, err = _cli(monkeypatch, capsys, [str(exported("tiny-sd")), "--prompt", "x", "--control-image", str(edges),
                                          "--output", str(tmp_path / "o.png")])
    assert code == 2 and len(err.splitlines()) == 1
    assert "has no ControlNet" in err and "linfusion-export --controlnet" in err


def test_cli_control_flags_need_a_control_image(monkeypatch, capsys, tmp_path, exported):
    code, err = _cli(monkeypatch, capsys, [str(exported("tiny-sd")), "--prompt", "x", "--control-scale", "0.5",
                                          "--output", str(tmp_path / "o.png")])
    assert code == 2 and "--control-scale is only used with --control-image" in err
