"""The staged hires chain (runtime/hires.py) against diffusers' chain, and its rules and checks by hand."""

import numpy as np
import pytest
import torch
from linfusion.runtime.hires import Hires, Stage, default_strengths, plan_stages, run_chain, stages
from linfusion.runtime.request import GenerationError, GenerationRequest
from PIL import Image

from linfusion import load_pipeline

PROMPT = "a lighthouse on a cliff at dusk"


def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


# ---- the auto rule and the checks, against hand-derived values -------------------------------

def sizes(chain):
    return [(s.width, s.height) for s in chain]


def test_auto_rule_sd15_16k_is_the_official_recipe():
    chain = stages(Hires(), 16384, 8192, steps=50, native=512, multiple=64)
    assert sizes(chain) == [(1024, 512), (2048, 1024), (4096, 2048), (8192, 4096), (16384, 8192)]
    assert [s.strength for s in chain] == [None, 0.4, 0.3, 0.2, 0.1]
    assert [s.steps for s in chain] == [50] * 5 and [s.index for s in chain] == [0, 1, 2, 3, 4]


def test_auto_rule_other_sizes():
    # SD-XL (native 1024): 16384 / 8 = 2048 <= 2 * 1024, three doublings, linear 0.4 -> 0.1.
    chain = stages(Hires(), 16384, 8192, steps=30, native=1024, multiple=32)
    assert sizes(chain) == [(2048, 1024), (4096, 2048), (8192, 4096), (16384, 8192)]
    assert [s.strength for s in chain[1:]] == [0.4, 0.25, 0.1]
    # 3072 / 4 = 768 <= 1024 (3072 / 2 = 1536 is not): two stages, 0.4 then 0.1.
    assert sizes(stages(Hires(), 3072, 2048, 20, 512, 64)) == [(768, 512), (1536, 1024), (3072, 2048)]
    # At most twice the native side needs no upscale stage: one text-to-image pass.
    assert stages(Hires(), 1024, 1024, 20, 512, 64) == [Stage(0, 1024, 1024, None, 20)]
    assert stages(Hires("off"), 16384, 8192, 20, 512, 64) == [Stage(0, 16384, 8192, None, 20)]


def test_default_strengths_are_linear_from_04_to_01():
    assert default_strengths(4) == (0.4, 0.3, 0.2, 0.1)
    assert default_strengths(2) == (0.4, 0.1)
    assert default_strengths(1) == (0.4,)
    assert np.allclose(default_strengths(7), np.linspace(0.4, 0.1, 7), rtol=0, atol=1e-15)


def test_explicit_base_strengths_and_steps():
    chain = stages(Hires(base=(512, 256), strengths=(0.5, 0.25), steps=8), 2048, 1024, 40, 512, 64)
    assert chain == [Stage(0, 512, 256, None, 40), Stage(1, 1024, 512, 0.5, 8), Stage(2, 2048, 1024, 0.25, 8)]
    # Strengths alone fix the stage count: 2 strengths, so the base is the target / 4.
    assert sizes(stages(Hires(strengths=(0.3, 0.2)), 2048, 1024, 40, 512, 64))[0] == (512, 256)
    # A base alone: default strengths over its stages.
    assert [s.strength for s in stages(Hires(base=(256, 128)), 2048, 1024, 40, 512, 64)] == [None, 0.4, 0.25, 0.1]


def test_parse_cli_strings():
    hires = Hires.parse("auto", "1024x512", "0.4,0.3, 0.2,0.1", "25")
    assert hires == Hires("auto", (1024, 512), (0.4, 0.3, 0.2, 0.1), 25)
    assert Hires.parse("OFF") == Hires("off")
    assert Hires.parse_strengths("") == ()


@pytest.mark.parametrize("hires,target,words", [
    (Hires(base=(2048, 512)), (1024, 1024), "larger than the target"),
    (Hires(base=(1024, 512)), (3072, 1536), "power of two"),
    (Hires(base=(1024, 512)), (2048, 2048), "power of two"),
    (Hires(base=(1024, 512)), (1024, 512), "no upscale stage"),
    (Hires(strengths=()), (2048, 1024), "zero upscale stages"),
    (Hires(strengths=(0.4, 0.0)), (2048, 1024), "(0, 1]"),
    (Hires(strengths=(1.5,)), (2048, 1024), "(0, 1]"),
    (Hires(strengths=(float("nan"),)), (2048, 1024), "finite"),
    (Hires(base=(512, 256), strengths=(0.4,)), (2048, 1024), "1 hires strengths for 2 upscale stages"),
    (Hires(base=(480, 240)), (1920, 960), "multiples of 64"),
    (Hires(strengths=(0.4, 0.3)), (2090, 1040), "does not halve"),
    (Hires(steps=4, strengths=(0.2,)), (2048, 1024), "runs no step"),
    (Hires("on"), (2048, 1024), "auto, off"),
    (Hires(base=(0, 512)), (2048, 1024), "at least 1"),
])
def test_bad_hires_is_one_line(hires, target, words):
    with pytest.raises(GenerationError) as info:
        stages(hires, *target, steps=20, native=512, multiple=64)
    message = str(info.value)
    assert words in message and "\n" not in message


def test_cli_options_and_stage_lines():
    import argparse

    from linfusion.runtime.hires import add_cli_arguments, from_cli, stage_line

    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(["--hires-base", "1024x512", "--hires-strengths", "0.4,0.3,0.2,0.1",
                              "--hires-steps", "30"])
    assert from_cli(args) == Hires("auto", (1024, 512), (0.4, 0.3, 0.2, 0.1), 30)
    assert from_cli(parser.parse_args(["--hires", "off"])) == Hires("off")
    record = {"stage": 2, "width": 4096, "height": 2048, "strength": 0.3, "cfg_mode": "batched", "encode": 1.0,
              "unet_per_step": 0.25, "denoise": 3.75, "decode": 2.0, "total": 6.75}
    assert stage_line(record) == ("stage 2: 4096x2048 img2img 0.3, batched CFG; encode 1.00s, UNet 0.250s/step, "
                                  "denoise 3.75s, decode 2.00s, total 6.75s")


@pytest.mark.parametrize("args", [("auto", "1024"), ("auto", "axb"), ("auto", None, "0.4,x"),
                                  ("auto", None, None, "0"), ("sometimes",)])
def test_bad_cli_strings_are_one_line(args):
    with pytest.raises(GenerationError) as info:
        Hires.parse(*args)
    assert "\n" not in str(info.value)


# ---- the chain on tiny exports against diffusers' chain --------------------------------------

@pytest.fixture(scope="module")
def runtime(exported):
    from linfusion.runtime import Pipeline

    cache = {}

    def get(preset):
        if preset not in cache:
            cache[preset] = Pipeline.from_export(exported(preset), backend="onnxruntime")
        return cache[preset]

    return get


def diffusers_chain(preset, chain, scheduler, seed, guidance):
    """What a diffusers user writes: one torch.Generator through txt2img then img2img per stage."""
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
    )

    base = load_pipeline(preset).pipeline
    if scheduler == "euler_a":
        base.scheduler = EulerAncestralDiscreteScheduler.from_config(base.scheduler.config)
    img2img = (StableDiffusionXLImg2ImgPipeline if "xl" in preset else StableDiffusionImg2ImgPipeline)(
        **base.components)
    generator = torch.Generator("cpu").manual_seed(seed)
    first, *rest = chain
    with torch.no_grad():
        image = base(PROMPT, width=first.width, height=first.height, num_inference_steps=first.steps,
                     guidance_scale=guidance, generator=generator).images[0]
        for stage in rest:
            image = image.resize((stage.width, stage.height), resample=Image.BICUBIC)
            out = img2img(PROMPT, image=image, strength=stage.strength, num_inference_steps=stage.steps,
                          guidance_scale=guidance, generator=generator,
                          output_type="np" if stage is rest[-1] else "pil")
            image = out.images[0]
    return image


@pytest.mark.parametrize("preset,scheduler,base", [
    ("tiny-sd", None, (64, 64)),        # the export's own scheduler (PNDM)
    ("tiny-sd", "euler_a", (64, 64)),   # ancestral: every step draws from the shared generator
    ("tiny-sdxl", None, (96, 64)),      # Euler; non-square for the SD-XL size conditioning
])
def test_chain_matches_diffusers_chain(runtime, preset, scheduler, base):
    pipe = runtime(preset)
    hires = Hires(base=base, strengths=(0.5, 0.3))
    request = GenerationRequest(PROMPT, width=base[0] * 4, height=base[1] * 4, num_inference_steps=10,
                                guidance_scale=5.0, seed=31, scheduler=scheduler, output_type="np",
                                tile_vae=False)
    ours = run_chain(pipe, request, hires)
    chain = stages(hires, request.width, request.height, 10, pipe.facts.default_size, pipe.facts.pixel_multiple)
    theirs = diffusers_chain(preset, chain, scheduler, 31, 5.0)
    assert ours.images.shape == (1, base[1] * 4, base[0] * 4, 3) and theirs.shape == ours.images.shape[1:]
    assert psnr(ours.images[0], theirs) >= 40
    assert ours.seed == 31
    records = ours.timings["stages"]
    assert [(r["stage"], r["width"], r["height"], r["strength"]) for r in records] == [
        (s.index, s.width, s.height, s.strength) for s in chain]
    assert ours.timings["denoise"] == pytest.approx(sum(r["denoise"] for r in records))


def test_callback_gets_stage_indices_and_two_argument_callbacks_still_work(runtime):
    pipe = runtime("tiny-sd")
    request = GenerationRequest(PROMPT, width=128, height=128, num_inference_steps=6, seed=2,
                                scheduler="euler", output_type="np")
    hires = Hires(base=(32, 32), strengths=(0.5, 0.34))
    calls, plain = [], []
    staged = run_chain(pipe, request, hires, callback=lambda stage, step, total: calls.append((stage, step, total)))
    # euler: stage 0 runs 6 steps, then int(6 * 0.5) = 3 and int(6 * 0.34) = 2.
    expected = ([(0, i, 6) for i in range(1, 7)] + [(1, i, 3) for i in range(1, 4)]
                + [(2, i, 2) for i in range(1, 3)])
    assert calls == expected
    again = run_chain(pipe, request, hires, callback=lambda step, total: plain.append((step, total)))
    assert plain == [c[1:] for c in expected]
    assert np.array_equal(again.images, staged.images)


def test_guidance_goes_sequential_where_the_batched_pass_does_not_fit(runtime):
    pipe = runtime("tiny-sd")
    request = GenerationRequest(PROMPT, width=128, height=128, num_inference_steps=4, guidance_scale=6.0,
                                seed=5, scheduler="euler", output_type="np")
    hires = Hires(base=(64, 64), strengths=(0.5,))
    seen = []

    def fits(plan):  # a memory guard that refuses batched guidance beyond 64x64
        seen.append((plan.width, plan.cfg_mode))
        return plan.cfg_mode == "sequential" or plan.width <= 64

    guarded = run_chain(pipe, request, hires, fits=fits)
    assert [r["cfg_mode"] for r in guarded.timings["stages"]] == ["batched", "sequential"]
    assert seen == [(64, "batched"), (128, "batched"), (128, "sequential")]
    free = run_chain(pipe, request, hires)
    assert [r["cfg_mode"] for r in free.timings["stages"]] == ["batched", "batched"]
    assert psnr(guarded.images, free.images) >= 60  # the same arithmetic in another order


def test_bad_requests_are_refused_before_any_model_runs(runtime, monkeypatch):
    pipe = runtime("tiny-sd")

    def no_model(*args, **kwargs):
        raise AssertionError("a model ran")

    monkeypatch.setattr(pipe, "generate", no_model)
    ok = GenerationRequest(PROMPT, width=128, height=128, num_inference_steps=4, seed=1)
    cases = [
        (ok, Hires(base=(256, 256)), "larger than the target"),
        (ok, Hires(base=(64, 64), strengths=(0.5, 0.2)), "strengths for 1 upscale"),
        (ok, Hires(base=(48, 48)), "power of two"),
        (GenerationRequest(PROMPT, width=128, height=96), Hires(base=(64, 48)), "multiples of 32"),
        (GenerationRequest(PROMPT, width=128, height=128, num_images_per_prompt=2), Hires(base=(64, 64)),
         "one image per call"),
        (GenerationRequest(PROMPT, width=128, height=128, scheduler="nope"), Hires(base=(64, 64)), "nope"),
    ]
    for request, hires, words in cases:
        with pytest.raises(GenerationError, match=words.replace("(", r"\(")):
            run_chain(pipe, request, hires)


def test_auto_on_a_tiny_export(runtime):
    pipe = runtime("tiny-sd")
    native = pipe.facts.default_size
    chain, plans, seed = plan_stages(pipe, GenerationRequest(PROMPT, width=4 * native, height=2 * native,
                                                             seed=9), Hires())
    # long side 4 * native: halved once reaches 2 * native.
    assert sizes(chain) == [(2 * native, native), (4 * native, 2 * native)]
    assert [p.width for p in plans] == [2 * native, 4 * native] and seed == 9


def test_hires_and_vae_are_torch_free():
    from torchless import run_without_torch

    result = run_without_torch("""
        from linfusion.runtime.hires import Hires, stages
        from linfusion.runtime.vae import choose_tiling
        assert len(stages(Hires(), 16384, 8192, 50, 512, 64)) == 5
        assert choose_tiling(2048, 1024, True, 64, 8).tile == 80
        assert_torch_free()
        print("torch-free ok")
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch-free ok" in result.stdout
