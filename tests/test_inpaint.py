"""Inpainting end to end: export of a 9-channel UNet, the torch-free runtime against diffusers'
StableDiffusion(XL)InpaintPipeline with LinFusion mounted (both UNet kinds, SD and SD-XL shapes),
validation, the memory guard, the CLI, and the refusals before any model runs."""


import numpy as np
import pytest
import torch
from linfusion.runtime.manifest import load_manifest
from linfusion.runtime.request import GenerationError, GenerationRequest
from PIL import Image
from test_runtime_pipeline import PROMPT, diffusers_scheduler, gradient_image, psnr
from torchless import run_without_torch

from linfusion import load_pipeline

WIDTH, HEIGHT = 96, 64


def box_mask(width=WIDTH, height=HEIGHT):
    """White (regenerate) over a box off the centre, black elsewhere; soft edges to exercise binarisation."""
    y, x = np.mgrid[0:height, 0:width]
    inside = (abs(x - width * 0.6) < width * 0.25) & (abs(y - height * 0.45) < height * 0.3)
    return Image.fromarray(np.where(inside, 230, 20).astype(np.uint8), "L").convert("RGB")


@pytest.fixture(scope="module")
def runtime(exported, inpaint_export):
    from linfusion.runtime import Pipeline

    cache = {}

    def get(preset):
        if preset not in cache:
            folder = inpaint_export(preset) if preset.endswith("-inpaint") else exported(preset)
            cache[preset] = Pipeline.from_export(folder, backend="onnxruntime")
        return cache[preset]

    return get


REFERENCES = {}


def diffusers_inpainting(preset, scheduler):
    """diffusers' inpainting pipeline with LinFusion mounted, with ``scheduler`` made from the preset's
    config (None: the preset's own scheduler): the preset's own for a 9-channel UNet, else the inpainting class around the text-to-image
    components (a regular UNet, blending)."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    if preset not in REFERENCES:
        pipe = load_pipeline(preset).pipeline
        if not preset.endswith("-inpaint"):
            pipe = (StableDiffusionXLInpaintPipeline if "xl" in preset else StableDiffusionInpaintPipeline)(
                **pipe.components)
        REFERENCES[preset] = pipe, pipe.scheduler
    pipe, default = REFERENCES[preset]
    pipe.scheduler = default if scheduler is None else diffusers_scheduler(scheduler, default.config)
    return pipe


def both(runtime, preset, scheduler, seed=0, latents=None, **args):
    """(runtime images, diffusers images) for the same request. A seed even with given latents: the VAE
    encodings sample from the generator (diffusers' global RNG without one)."""
    init, mask = gradient_image(WIDTH, HEIGHT), box_mask()
    ours = runtime(preset)(PROMPT, image=init, mask_image=mask, scheduler=scheduler, seed=seed,
                           latents=latents, height=HEIGHT, width=WIDTH, output_type="np", **args).images
    reference = diffusers_inpainting(preset, scheduler)
    generator = torch.Generator("cpu").manual_seed(seed)
    given = None if latents is None else torch.from_numpy(latents)
    with torch.no_grad():
        theirs = reference(PROMPT, image=init, mask_image=mask, height=HEIGHT, width=WIDTH,
                           generator=generator, latents=given, output_type="np", **args).images
    assert ours.shape == theirs.shape == (args.get("num_images_per_prompt", 1), HEIGHT, WIDTH, 3)
    return ours, theirs


@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sd-inpaint", "tiny-sdxl",
                                    pytest.param("tiny-sdxl-inpaint", marks=pytest.mark.slow)])
def test_same_latents_give_diffusers_inpainting(runtime, preset):
    latents = np.random.default_rng(4).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    ours, theirs = both(runtime, preset, "euler", latents=latents, strength=1.0, num_inference_steps=6,
                        guidance_scale=5.0, negative_prompt="blurry")
    assert psnr(ours, theirs) >= 40


@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sd-inpaint"])
def test_same_seed_gives_diffusers_inpainting_below_full_strength(runtime, preset):
    """Ancestral steps and strength < 1: every random draw (init and masked-image encodings, initial
    noise, per-step noise) in diffusers' order; two images per prompt."""
    ours, theirs = both(runtime, preset, "euler_a", seed=21, strength=0.7, num_inference_steps=8,
                        guidance_scale=4.0, num_images_per_prompt=2)
    assert psnr(ours, theirs) >= 40
    assert not np.array_equal(ours[0], ours[1])


def test_default_scheduler_blends_like_diffusers(runtime):
    """The exported scheduler (PNDM for SD-1.x): the init image noised to each next timestep."""
    ours, theirs = both(runtime, "tiny-sd", None, seed=5, strength=0.8, num_inference_steps=6, guidance_scale=3.0)
    assert psnr(ours, theirs) >= 40


def test_blending_keeps_the_unmasked_region(runtime):
    """With a regular UNet the last step puts back the init image's latents outside the mask: there
    the decoded image is the VAE round trip of the init image, whatever the prompt."""
    init, mask = gradient_image(WIDTH, HEIGHT), box_mask()
    args = {"image": init, "mask_image": mask, "height": HEIGHT, "width": WIDTH, "num_inference_steps": 4,
            "output_type": "np"}
    first = runtime("tiny-sd")("a red apple", seed=1, **args).images[0]
    second = runtime("tiny-sd")("a blue car", seed=2, **args).images[0]
    outside = np.asarray(mask.convert("L"))[::8, ::8] < 128  # latent pixels kept (nearest)
    keep = np.kron(outside, np.ones((8, 8), bool))
    core = keep & np.roll(keep, 8, 0) & np.roll(keep, -8, 0) & np.roll(keep, 8, 1) & np.roll(keep, -8, 1)
    assert psnr(first[core], second[core]) > psnr(first[~keep], second[~keep]) + 10


def test_inpainting_unet_export_declares_nine_channels(inpaint_export):
    manifest = load_manifest(inpaint_export("tiny-sd-inpaint"))
    assert manifest.components["unet"].input("sample").shape == ("batch", 9, "height", "width")
    assert manifest.components["unet"].outputs[0].shape == ("batch", 4, "height", "width")
    assert manifest.pipeline.latent_channels == 4
    assert manifest.pipeline.pipeline_class == "StableDiffusionInpaintPipeline"
    assert manifest.parity["unet"]["passed"]


def test_validation_covers_the_inpainting_unet(inpaint_export, capsys):
    from linfusion.export.validation.cli import main

    code = main([str(inpaint_export("tiny-sd-inpaint")), "--components", "unet", "--sizes", "64x96",
                 "--backends", "onnxruntime", "--batch", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith("PASSED")


def test_requests_refused_before_any_model_runs(runtime, tmp_path):
    plain, inpainting = runtime("tiny-sd"), runtime("tiny-sd-inpaint")
    init = gradient_image(WIDTH, HEIGHT)
    cases = [
        (inpainting, {}, "inpainting UNet"),
        (inpainting, {"image": init}, "inpainting UNet"),
        (plain, {"mask_image": box_mask()}, "needs an init image"),
        (plain, {"image": init, "mask_image": box_mask(64, 64)}, "proportions differ"),
        (plain, {"image": init, "mask_image": np.zeros((HEIGHT, WIDTH, 3))}, "one channel"),
        (plain, {"image": init, "mask_image": box_mask(), "strength": 0.5,
                     "latents": np.zeros((1, 4, 8, 12), np.float32)}, "strength 1"),
    ]
    for pipe, fields, message in cases:
        with pytest.raises(GenerationError, match=message) as info:
            pipe.plan(GenerationRequest(PROMPT, **fields))
        assert "\n" not in str(info.value)
    plan = plain.plan(GenerationRequest(PROMPT, image=init, mask_image=box_mask(2 * WIDTH, 2 * HEIGHT)))
    assert plan.strength == 1.0 and plan.mask.shape == (1, 1, HEIGHT, WIDTH)


def test_memory_guard_counts_the_encoder_calls(runtime):
    """One VAE encode (the masked image) costs what img2img's does; strength < 1 encodes the init image
    too, a second call at the same shape, which ORT's memory pattern makes dearer."""
    init, limit = gradient_image(WIDTH, HEIGHT), "64G"
    img2img = runtime("tiny-sd").plan(GenerationRequest(PROMPT, image=init, memory_limit=limit)).memory
    pipe = runtime("tiny-sd-inpaint")
    full = pipe.plan(GenerationRequest(PROMPT, image=init, mask_image=box_mask(), memory_limit=limit)).memory
    partial = pipe.plan(GenerationRequest(PROMPT, image=init, mask_image=box_mask(), strength=0.5,
                                          memory_limit=limit)).memory
    assert full.stages["vae_encode"] == img2img.stages["vae_encode"] > 0
    # A second encoder call at the same shape reuses the session's arena: with ONNX Runtime's memory
    # pattern off (backends/onnxruntime.py) it adds no memory, so it is counted (PATTERN_REPEAT) but equal.
    assert partial.stages["vae_encode"] >= full.stages["vae_encode"]
    assert partial.total - full.total == partial.stages["vae_encode"] - full.stages["vae_encode"]


def test_cli_inpaints_and_refuses_bad_masks_before_loading(inpaint_export, tmp_path, capsys):
    from linfusion.runtime.cli import main

    gradient_image(WIDTH, HEIGHT).save(tmp_path / "init.png")
    box_mask().save(tmp_path / "mask.png")
    box_mask(64, 64).save(tmp_path / "square.png")
    missing = str(tmp_path / "no-export")  # the refusals come before the export is even opened
    init = ["--init-image", str(tmp_path / "init.png")]
    for args, message in [(["--mask-image", str(tmp_path / "mask.png")], "--mask-image needs --init-image"),
                          ([*init, "--mask-image", str(tmp_path / "square.png")], "proportions differ"),
                          ([*init, "--mask-image", str(tmp_path / "x.png")], "cannot read mask image")]:
        assert main([missing, "--prompt", "x", *args, "--output", str(tmp_path / "o.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    code = main([str(inpaint_export("tiny-sd-inpaint")), "--prompt", "a cat", "--steps", "3", "--seed", "3",
                 "--init-image", str(tmp_path / "init.png"), "--mask-image", str(tmp_path / "mask.png"),
                 "--output", str(tmp_path / "out.png")])
    assert code == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "out.png").size == (WIDTH, HEIGHT)


def test_inpainting_without_torch(inpaint_export, tmp_path):
    gradient_image(WIDTH, HEIGHT).save(tmp_path / "init.png")
    box_mask().save(tmp_path / "mask.png")
    result = run_without_torch(f"""
        import numpy as np
        from linfusion.runtime import Pipeline
        pipe = Pipeline.from_export({str(inpaint_export("tiny-sd-inpaint"))!r}, backend="onnxruntime")
        out = pipe("a cat", image={str(tmp_path / "init.png")!r}, mask_image={str(tmp_path / "mask.png")!r},
                   num_inference_steps=2, seed=1, output_type="np")
        assert out.images.shape == (1, {HEIGHT}, {WIDTH}, 3) and np.isfinite(out.images).all()
        assert_torch_free()
        print("torch-free ok")
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch-free ok" in result.stdout
