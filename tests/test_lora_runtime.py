"""LoRA hot-swap in the torch-free runtime against diffusers' load_lora_weights + fuse_lora, thread safety
of set_loras, bad input, and linfusion-generate --lora."""

import threading

import numpy as np
import pytest
import torch
from test_lora_files import make_peft_lora, write_kohya

from linfusion import load_pipeline

PROMPT = "a watercolor painting of a fox in the snow"
ARGS = dict(negative_prompt="blurry", height=64, width=96, num_inference_steps=4, guidance_scale=6.0,  # noqa: C408
            scheduler="euler", output_type="np")


def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    cache = {}

    def get(preset, seed=0):
        if (preset, seed) not in cache:
            cache[preset, seed] = make_peft_lora(preset, tmp_path_factory.mktemp(f"lora-{preset}"), seed=seed)
        return cache[preset, seed]

    return get


def latents_for(preset):
    return np.random.default_rng(1).standard_normal((1, 4, 8, 12)).astype(np.float32)


def diffusers_fused(preset, path, scale):
    from diffusers import EulerDiscreteScheduler

    pipe = load_pipeline(preset).pipeline
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return pipe


def unet_feeds(runner, rng):
    feeds = {}
    for spec in runner.spec.inputs:
        shape = [2 if a == "batch" else 8 if isinstance(a, str) else a for a in spec.shape]
        feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    feeds["timestep"] = np.array([700.0, 30.0], np.float32)
    if "time_ids" in feeds:
        feeds["time_ids"] = np.array([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2, np.float32)
    return feeds


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sdxl"])
def test_hot_swap_matches_diffusers(exported, loras, preset):
    """UNet and text encoder(s): the outputs of diffusers' fused modules (within the export's parity bound; the
    1e-5 bound against export-time fusion is test_lora_export's), and the same image from the same latents
    (PSNR >= 45 dB), while the LoRA itself changes the image far more than that."""
    from linfusion.runtime import Pipeline

    path = loras(preset)
    ours = Pipeline.from_export(exported(preset), backend="onnxruntime", loras=[(path, 0.8)])
    assert ours.loras[0]["applied"]["unet"] > 0 and ours.loras[0]["unplaced"] == 0
    assert all(ours.loras[0]["applied"][name] > 0 for name in ours.facts.text_encoders)
    theirs = diffusers_fused(preset, path, 0.8)
    rng = np.random.default_rng(0)
    feeds = unet_feeds(ours.runners["unet"], rng)
    out = ours.runners["unet"].run(feeds)["out_sample"]
    added = {"text_embeds": torch.from_numpy(feeds["text_embeds"]), "time_ids": torch.from_numpy(feeds["time_ids"])} \
        if ours.xl else None
    with torch.no_grad():
        ref = theirs.unet(torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"]),
                          torch.from_numpy(feeds["encoder_hidden_states"]), added_cond_kwargs=added).sample.numpy()
        ids = rng.integers(0, 1000, (2, 77))
        for name in ours.facts.text_encoders:
            hidden = ours.runners[name].run({"input_ids": ids})["penultimate_hidden_state"]
            expected = getattr(theirs, name)(torch.from_numpy(ids), output_hidden_states=True).hidden_states[-2]
            assert np.abs(hidden - expected.numpy()).max() <= 1e-5 * np.abs(expected.numpy()).max(), name
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()  # the export's own parity bound (ORT vs torch)

    latents = latents_for(preset)
    image = ours(PROMPT, latents=latents, **ARGS).images
    with torch.no_grad():
        expected = theirs(PROMPT, latents=torch.from_numpy(latents), **ARGS).images
    plain = Pipeline.from_export(exported(preset), backend="onnxruntime")(PROMPT, latents=latents, **ARGS).images
    assert psnr(image, expected) >= 45
    assert psnr(plain, expected) < 30


def test_set_loras_while_a_request_runs(exported, loras):
    """A request in flight finishes with the weights it started with; the next one gets the new ones;
    [] restores the export's own weights."""
    from linfusion.runtime import Pipeline

    directory, path = exported("tiny-sd"), loras("tiny-sd")
    latents = latents_for("tiny-sd")
    pipe = Pipeline.from_export(directory, backend="onnxruntime")
    base = pipe(PROMPT, latents=latents, **ARGS).images
    with_lora = Pipeline.from_export(directory, backend="onnxruntime", loras=[str(path) + ":0.8"])(
        PROMPT, latents=latents, **ARGS).images
    assert psnr(base, with_lora) < 30

    started, swapped, result = threading.Event(), threading.Event(), {}

    def hold(step, total):
        if step == 1:
            started.set()
            assert swapped.wait(60)

    worker = threading.Thread(target=lambda: result.update(image=pipe(PROMPT, latents=latents, callback=hold,
                                                                      **ARGS).images))
    old_unet, closed = pipe.runners["unet"], []
    old_unet.close = lambda: closed.append("unet")  # a TensorRT engine frees its GPU memory there
    worker.start()
    assert started.wait(60)
    applied = pipe.set_loras([(path, 0.8)])
    assert closed == []  # still in use
    swapped.set()
    after = pipe(PROMPT, latents=latents, **ARGS).images
    worker.join(60)
    assert closed == ["unet"]  # closed once the request in flight was done with it, not before
    assert applied[0]["applied"] == {"text_encoder": 9, "unet": 70}
    assert psnr(result["image"], base) >= 60  # in flight: the old weights all the way
    assert psnr(after, with_lora) >= 60
    # the rebuilt sessions keep the runtime's session settings (one shared CPU arena, no prepacking)
    options = pipe.runners["unet"].session.get_session_options()
    assert options.get_session_config_entry("session.use_env_allocators") == "1"
    assert options.get_session_config_entry("session.disable_prepacking") == "1"
    pipe.set_loras([])
    assert psnr(pipe(PROMPT, latents=latents, **ARGS).images, base) >= 60 and pipe.loras == []


def test_kohya_and_several_loras_add_up(exported, loras, tmp_path):
    """A kohya file hot-swaps like the PEFT file it was written from; two LoRAs add up in order."""
    from linfusion.runtime import Pipeline

    directory, path = exported("tiny-sd"), loras("tiny-sd")
    kohya = write_kohya(path, tmp_path / "kohya.safetensors")
    latents = latents_for("tiny-sd")
    peft_image = Pipeline.from_export(directory, backend="onnxruntime", loras=[(path, 0.5), (path, 0.3)])(
        PROMPT, latents=latents, **ARGS).images
    kohya_image = Pipeline.from_export(directory, backend="onnxruntime", loras=[(kohya, 0.8)])(
        PROMPT, latents=latents, **ARGS).images
    assert psnr(peft_image, kohya_image) >= 60


def test_bad_lora_changes_nothing(exported, loras, tmp_path):
    from linfusion.runtime import Pipeline
    from linfusion.runtime.lora_keys import LoraError, read_lora_file
    from safetensors.numpy import save_file

    pipe = Pipeline.from_export(exported("tiny-sd"), backend="onnxruntime", loras=[(loras("tiny-sd"), 1.0)])
    unet = pipe.runners["unet"]
    tensors, metadata = read_lora_file(loras("tiny-sd"))
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    wide = {**tensors, key: np.concatenate([tensors[key]] * 2, axis=1)}  # a LoRA for a wider model
    save_file(wide, str(tmp_path / "other.safetensors"), metadata)
    with pytest.raises(LoraError, match=rf"{key} does not fit the model: up \(\d+, 4\) @ down \(4, 64\), the "
                                        r"model's .*attn2.to_k.weight is \(\d+, 32\)"):
        pipe.set_loras([(tmp_path / "other.safetensors", 1.0)])
    with pytest.raises(LoraError, match="must be a finite number"):
        pipe.set_loras([(loras("tiny-sd"), float("nan"))])
    assert pipe.runners["unet"] is unet and pipe.loras[0]["scale"] == 1.0


def test_generate_cli(exported, loras, tmp_path, capsys):
    from linfusion.runtime.cli import main

    directory, path = exported("tiny-sd"), loras("tiny-sd")
    out = tmp_path / "fox.png"
    assert main([str(directory), "--prompt", "a fox", "--steps", "2", "--height", "64", "--width", "64",
                 "--seed", "1", "--backend", "onnxruntime", "--lora", f"{path}:0.7", "--output", str(out)]) == 0
    assert "lora pytorch_lora_weights.safetensors (scale 0.7): 9 tensors on text_encoder, 70 tensors on unet" \
        in capsys.readouterr().out and out.is_file()
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x04not really")
    assert main([str(directory), "--prompt", "a fox", "--lora", str(tmp_path / "old.ckpt"),
                 "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pickle" in err and "never opened" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_hot_swap_on_an_fp16_export(exported, loras):
    """fp16 weights get the update too (ORT's fp16 fusions once dropped overridden initializers): the fp16
    UNet with the LoRA is close to the fp32 one with it, and far from the fp16 one without."""
    from linfusion.runtime import Pipeline

    path = loras("tiny-sd")
    fp32 = Pipeline.from_export(exported("tiny-sd"), backend="onnxruntime", loras=[(path, 0.8)]).runners["unet"]
    fp16 = Pipeline.from_export(exported("tiny-sd", "fp16"), backend="onnxruntime", loras=[(path, 0.8)])
    plain = Pipeline.from_export(exported("tiny-sd", "fp16"), backend="onnxruntime").runners["unet"]
    feeds = unet_feeds(fp32, np.random.default_rng(4))
    ref = fp32.run(feeds)["out_sample"]
    half = {k: v.astype(np.float16) if k != "timestep" else v for k, v in feeds.items()}
    scale = np.abs(ref).max()
    assert np.abs(fp16.runners["unet"].run(half)["out_sample"].astype(np.float32) - ref).max() <= 1e-2 * scale
    assert np.abs(plain.run(half)["out_sample"].astype(np.float32) - ref).max() > 0.1 * scale
