"""ControlNet end to end: export (ONNX graph I/O, parity), runtime against diffusers'
StableDiffusion(XL)ControlNetPipeline with LinFusion mounted, validation and engine profiles."""

import numpy as np
import pytest
import torch
from linfusion.runtime.contract import ControlNetIO, Residuals, UNetIO
from PIL import Image

from linfusion import load_pipeline

PROMPT = "a watercolor painting of a fox in the snow"
ARGS = {"negative_prompt": "blurry", "height": 64, "width": 96, "num_inference_steps": 6, "guidance_scale": 6.0}
CONTROLNETS = {"tiny-sd": 2, "tiny-sdxl": 1}
"""SD with two ControlNets (controlnet_0, controlnet_1), SD-XL with one (controlnet)."""


def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def control_image(seed, size=(120, 80)):
    """Random RGB at another size than the request's (both sides resize it)."""
    pixels = np.random.default_rng(seed).random((size[1], size[0], 3))
    return Image.fromarray((pixels * 255).astype(np.uint8))


def attached(preset):
    from linfusion.export.controlnet import attach_controlnets

    loaded = load_pipeline(preset)
    attach_controlnets(loaded, ["random"] * CONTROLNETS[preset])
    return loaded


@pytest.fixture(scope="module")
def cn_export(exported, tmp_path_factory):
    """One ControlNet export per preset (no VAE encoder: ControlNet img2img is not supported). Its UNet
    and ControlNets are exported here; the text encoders and VAE decoder come from the session's
    export of the preset, which has the same weights (checked)."""
    from linfusion.export.exporter import available_components
    from partial_export import export_onto, same_weights

    cache = {}

    def get(preset):
        if preset not in cache:
            loaded = attached(preset)
            same_weights(loaded.pipeline, load_pipeline(preset).pipeline)
            names = [n for n in available_components(loaded.is_xl, CONTROLNETS[preset])
                     if n == "unet" or n.startswith("controlnet")]
            tmp = tmp_path_factory.mktemp("controlnet")
            manifest = export_onto(exported(preset), loaded, names, tmp / preset, tmp, drop=("vae_encoder",))
            cache[preset] = (tmp / preset, manifest)
        return cache[preset]

    return get


@pytest.fixture(scope="module")
def runtime(cn_export):
    from linfusion.runtime import Pipeline

    return lambda preset: Pipeline.from_export(cn_export(preset)[0], backend="onnxruntime")


def reference_pipeline(preset):
    """diffusers' ControlNet pipeline on the same components, with the same seeded ControlNets."""
    from diffusers import (
        MultiControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetPipeline,
    )
    from linfusion.export.controlnet import controlnets_of

    loaded = attached(preset)
    pipe = loaded.pipeline
    models = list(controlnets_of(pipe).values())
    cls = StableDiffusionXLControlNetPipeline if loaded.is_xl else StableDiffusionControlNetPipeline
    parts = {**pipe.components, "controlnet": models[0] if len(models) == 1 else MultiControlNetModel(models)}
    if not loaded.is_xl:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    expected, optional = cls._get_signature_keys(cls)
    return cls(**{k: v for k, v in parts.items() if k in set(expected) | set(optional)})


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sdxl"])
def test_export_graph_io_and_parity(cn_export, preset):
    """The graphs' own I/O names are the contract's; parity ran against PyTorch for every part."""
    import onnx

    folder, manifest = cn_export(preset)
    xl = preset == "tiny-sdxl"
    names = ["controlnet"] if CONTROLNETS[preset] == 1 else ["controlnet_0", "controlnet_1"]
    assert [n for n in manifest.components if n.startswith("controlnet")] == names
    config = load_pipeline(preset).pipeline.unet.config
    residuals = Residuals.of_unet(config.block_out_channels, config.layers_per_block)
    conditioning = [UNetIO.text_embeds, UNetIO.time_ids] if xl else []
    graph = onnx.load(str(folder / names[-1] / "model.onnx"), load_external_data=False)
    assert [i.name for i in graph.graph.input] == [
        ControlNetIO.sample, ControlNetIO.timestep, ControlNetIO.encoder_hidden_states,
        ControlNetIO.controlnet_cond, ControlNetIO.conditioning_scale, *conditioning]
    assert [o.name for o in graph.graph.output] == residuals.names
    unet = onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False)
    assert [i.name for i in unet.graph.input][-len(residuals.names):] == residuals.names
    for name in (*names, "unet"):
        assert manifest.parity[name]["passed"], name
    assert manifest.source["controlnets"] == ["random"] * CONTROLNETS[preset]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sdxl"])
def test_same_latents_give_diffusers_controlnet_image(runtime, preset):
    count = CONTROLNETS[preset]
    images = [control_image(i) for i in range(count)]
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 12)).astype(np.float32)
    scales = [0.8, 1.3][:count]
    pipe, reference = runtime(preset), reference_pipeline(preset)
    for extra in ({}, {"controlnet_conditioning_scale": scales if count > 1 else scales[0],
                       "control_guidance_start": 0.2, "control_guidance_end": 0.8}):
        control = images if count > 1 else images[0]
        ours = pipe(PROMPT, latents=latents, output_type="np", control_image=control, **ARGS, **extra).images
        with torch.no_grad():
            theirs = reference(PROMPT, image=control, latents=torch.from_numpy(latents), output_type="np",
                               **ARGS, **extra).images
        assert ours.shape == theirs.shape == (1, 64, 96, 3)
        assert psnr(ours, theirs) >= 40, extra
        if not extra:
            # The ControlNet matters: without it the image is far from diffusers' (so the test can fail).
            plain = pipe(PROMPT, latents=latents, output_type="np", **ARGS).images
            assert psnr(plain, ours) < 35


@pytest.mark.slow
def test_plain_text_to_image_on_a_controlnet_export_feeds_zeros(runtime):
    """No control image: zero residuals, which must give diffusers' plain StableDiffusionPipeline image."""
    latents = np.random.default_rng(1).standard_normal((2, 4, 8, 12)).astype(np.float32)
    args = {**ARGS, "negative_prompt": [ARGS["negative_prompt"]] * 2}  # diffusers wants a list for a list
    ours = runtime("tiny-sd")([PROMPT, "a red cube"], latents=latents, output_type="np", **args).images
    with torch.no_grad():
        theirs = load_pipeline("tiny-sd").pipeline([PROMPT, "a red cube"], latents=torch.from_numpy(latents),
                                                   output_type="np", **args).images
    assert psnr(ours, theirs) >= 40


@pytest.mark.slow
def test_sequential_guidance_and_batches_match_batched(runtime):
    """Sequential CFG runs each ControlNet per half with that half's text: same image as batched."""
    pipe = runtime("tiny-sd")
    latents = np.random.default_rng(2).standard_normal((2, 4, 8, 12)).astype(np.float32)
    images = [control_image(3), control_image(4)]
    kwargs = dict(latents=latents, output_type="np", control_image=images, num_images_per_prompt=2, **ARGS)
    batched = pipe(PROMPT, **kwargs).images
    sequential = pipe(PROMPT, cfg_mode="sequential", **kwargs).images
    assert psnr(batched, sequential) >= 60


@pytest.mark.slow
def test_validation_covers_the_controlnet(cn_export):
    from linfusion.export.validation.validate import Options, validate

    folder, _ = cn_export("tiny-sdxl")
    report = validate(Options(folder, backends=["onnxruntime"], sizes=[(64, 64)], components=["controlnet"]),
                      progress=lambda line: None)
    checks = [c for c in report.checks if c.component == "controlnet"]
    assert checks and all(c.status == "passed" for c in checks)
    assert {m.output for c in checks for m in c.outputs} >= {ControlNetIO.mid_block_residual}


@pytest.mark.slow
def test_engine_profiles_cover_the_residual_inputs(cn_export):
    """Each residual's profile is the latent profile divided by its level's factor (hand-derived)."""
    from linfusion.engines.profiles import Range, component_profiles, spatial_profiles
    from linfusion.runtime.manifest import load_manifest

    folder, _ = cn_export("tiny-sd")
    manifest = load_manifest(folder, verify=False)
    spatial = spatial_profiles(manifest.pixel_multiple, 64, 128, 256)
    unet = component_profiles(manifest, "unet", spatial, Range(1, 1, 2))[0].shapes
    # tiny-sd: VAE factor 8, block channels (32, 64, 64): 64..256 px -> latents 8..32, opt 16.
    assert unet[UNetIO.sample] == [[1, 4, 8, 8], [2, 4, 16, 16], [4, 4, 16, 16]]
    assert unet[ControlNetIO.down_block_residual(3)] == [[1, 64, 4, 4], [2, 64, 8, 8], [4, 64, 8, 8]]
    assert unet[ControlNetIO.mid_block_residual] == [[1, 64, 2, 2], [2, 64, 4, 4], [4, 64, 4, 4]]
    control = component_profiles(manifest, "controlnet_0", spatial, Range(1, 1, 2))[0].shapes
    assert control[ControlNetIO.controlnet_cond] == [[1, 3, 64, 64], [2, 3, 128, 128], [4, 3, 128, 128]]
    assert control[ControlNetIO.conditioning_scale] == [[1], [1], [1]]
