"""The numpy PNDM/PLMS scheduler against diffusers' PNDMScheduler (torch) as the independent reference.

Both sides run the same loop: each evaluates the same stand-in model on its own state, plus the same
random term per step, so the whole trajectory (PRK warm-up, the repeated PLMS timestep, every order
of the multistep formula) is compared step by step. The end-to-end tests run the runtime Pipeline on
a tiny-sd export against diffusers' StableDiffusion pipelines with PNDM.
"""

import inspect
import itertools
import json

import diffusers
import numpy as np
import pytest
import torch
from linfusion.runtime.schedulers import SCHEDULERS, PNDMScheduler, default_scheduler_name, make_scheduler
from test_schedulers import ATOL, LINEAR, SD15, SHAPE, scaled_diff, stand_in_model
from torchless import run_without_torch

STEPS = (1, 2, 3, 4, 5, 7, 10, 14, 15, 25, 33, 50)
SPACINGS = ("leading", "linspace", "trailing")
BOTH = ("epsilon", "v_prediction")
CONFIG_GRID = [
    pytest.param({"skip_prk_steps": skip, "timestep_spacing": spacing, "prediction_type": prediction,
                  "set_alpha_to_one": to_one, "steps_offset": offset},
                 id=f"{'plms' if skip else 'prk'}-{spacing}-{prediction}-alpha1={to_one}-offset{offset}")
    for skip, spacing, prediction, to_one, offset
    in itertools.product((True, False), SPACINGS, BOTH, (True, False), (0, 1))
]
BETAS = [
    pytest.param(LINEAR, id="linear"),
    pytest.param({**SD15, "beta_schedule": "squaredcos_cap_v2"}, id="cosine"),
    pytest.param({**SD15, "trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}, id="trained-betas"),
    pytest.param({**SD15, "num_train_timesteps": 500}, id="500-train-steps"),
]


def both(config, steps=None):
    ours, ref = PNDMScheduler.from_config(config), diffusers.PNDMScheduler.from_config(config)
    if steps is not None:
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
    return ours, ref


def denoise_both(ours, ref, latents, begin=0, seed=0, label=""):
    """Step both through timesteps[begin:], checking every output; returns the number of steps."""
    pattern = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    extra = np.random.default_rng(seed)
    x_ours, x_ref = latents.copy(), torch.from_numpy(latents.copy())
    steps = list(zip(ours.timesteps[begin:], ref.timesteps[begin:]))
    assert steps, label
    for i, (t_ours, t_ref) in enumerate(steps):
        in_ours, in_ref = ours.scale_model_input(x_ours, t_ours), ref.scale_model_input(x_ref, t_ref)
        assert scaled_diff(in_ours, in_ref.numpy()) <= ATOL, f"{label}: model input {i}"
        random_part = np.float32(0.5) * extra.standard_normal(SHAPE).astype(np.float32)
        out_ours = stand_in_model(in_ours, t_ours, pattern) + random_part
        out_ref = torch.from_numpy(stand_in_model(in_ref.numpy(), t_ref.item(), pattern) + random_part)
        assert not ours.step_needs_noise(t_ours)
        x_ours = ours.step(out_ours, t_ours, x_ours)
        x_ref = ref.step(out_ref, t_ref, x_ref).prev_sample
        assert x_ours.dtype == np.float32 and x_ours.shape == SHAPE
        diff = scaled_diff(x_ours, x_ref.numpy())
        assert diff <= ATOL, f"{label}: step {i} (t={t_ref.item()}) differs by {diff:.3g}"
    return len(steps)


def check_schedule(ours, ref, label):
    assert ours.timesteps.dtype == np.int64, label
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy(), err_msg=f"{label}: timesteps")
    assert ours.init_noise_sigma == float(ref.init_noise_sigma) == 1.0
    assert ours.order == ref.order == 1


def run_grid(config, steps_list, label):
    latents = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for steps in steps_list:
        ours, ref = both(config)
        if not config.get("skip_prk_steps") and steps < 4:
            with pytest.raises(ValueError, match="at least 4 inference steps"):
                ours.set_timesteps(steps)
            with pytest.raises(Exception):  # noqa: B017 - diffusers fails with a numpy broadcast error
                ref.set_timesteps(steps)
            continue
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        check_schedule(ours, ref, f"{label} {steps} steps")
        # PLMS repeats its second timestep (one step has none); PRK adds 9 for the RK4 midpoints.
        extra = (1 if steps > 1 else 0) if config.get("skip_prk_steps") else 9
        assert len(ours.timesteps) == steps + extra
        assert denoise_both(ours, ref, latents, seed=steps, label=f"{label} {steps} steps") == steps + extra


@pytest.mark.parametrize("overrides", CONFIG_GRID)
def test_matches_diffusers(overrides):
    run_grid({**SD15, **overrides}, STEPS, str(overrides))


@pytest.mark.parametrize("skip", [True, False], ids=["plms", "prk"])
@pytest.mark.parametrize("config", BETAS)
def test_beta_schedules_match_diffusers(config, skip):
    for prediction in BOTH:
        run_grid({**config, "skip_prk_steps": skip, "prediction_type": prediction}, (1, 4, 9, 20), prediction)


@pytest.mark.parametrize("skip", [True, False], ids=["plms", "prk"])
@pytest.mark.parametrize("steps, strength", [(10, 0.6), (25, 0.3), (8, 1.0), (12, 0.9)])
def test_img2img_matches_diffusers(steps, strength, skip):
    """SDEdit as runtime/pipeline.py's _img2img_latents does it: timesteps[t_start * order:], begin index
    set, the image noised to the first of them. diffusers' PNDM has no begin index; its counter starts
    at 0 on the first step run, and ours must do the same."""
    ours, ref = both({**SD15, "skip_prk_steps": skip}, steps)
    t_start = max(steps - min(int(steps * strength), steps), 0) * ours.order
    ours.set_begin_index(t_start)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start)
    rng = np.random.default_rng(2)
    image_latents, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    start = np.repeat(ours.timesteps[t_start:t_start + 1], SHAPE[0])
    noisy_ours = ours.add_noise(image_latents, noise, start)
    noisy_ref = ref.add_noise(torch.from_numpy(image_latents), torch.from_numpy(noise),
                              torch.from_numpy(start))
    assert noisy_ours.dtype == np.float32
    assert scaled_diff(noisy_ours, noisy_ref.numpy()) <= ATOL
    assert ours.step_index == t_start
    taken = denoise_both(ours, ref, noisy_ours, begin=t_start, seed=3, label=f"img2img t_start={t_start}")
    assert taken == len(ours.timesteps) - t_start and ours.step_index == len(ours.timesteps)


def test_add_noise_matches_diffusers_per_sample():
    ours, ref = both(SD15, 20)
    rng = np.random.default_rng(4)
    x, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    for picks in ([0, 7], [20, 20], [3, 11]):
        got = ours.add_noise(x, noise, ours.timesteps[picks])
        want = ref.add_noise(torch.from_numpy(x), torch.from_numpy(noise), ref.timesteps[picks]).numpy()
        assert scaled_diff(got, want) <= ATOL, picks
    assert not np.allclose(got[0], ours.add_noise(x, noise, ours.timesteps[[0, 0]])[0])


@pytest.mark.parametrize("skip", [True, False], ids=["plms", "prk"])
def test_copy_continues_independently_and_set_timesteps_resets(skip):
    """A copy taken mid-run carries counter and history; set_timesteps starts a fresh run."""
    config = {**SD15, "skip_prk_steps": skip}
    ours, _ = both(config, 8)
    latents = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    x = latents.copy()
    for t in ours.timesteps[:6]:
        x = ours.step(np.float32(0.2) * x + np.float32(1.0), t, x)
    fork = ours.copy()
    original_state = (ours.counter, len(ours.ets))
    x_fork = fork.step(x, fork.timesteps[6], x)
    assert (ours.counter, len(ours.ets)) == original_state and fork.counter == 7
    assert np.array_equal(ours.step(x, ours.timesteps[6], x), x_fork)
    for steps in (5, 8):  # after a part-run, a new set_timesteps must forget the old history
        ours.set_timesteps(steps)
        _, ref = both(config, steps)
        assert ours.counter == 0 and ours.ets == [] and ours.step_index == 0
        denoise_both(ours, ref, latents, label=f"re-set {steps}")
        ours.set_timesteps(steps)
        ours.step(x, ours.timesteps[0], x)


def test_registry_and_default_name():
    assert SCHEDULERS["pndm"][0] is PNDMScheduler
    assert default_scheduler_name({"_class_name": "PNDMScheduler"}) == "pndm"
    assert default_scheduler_name(SD15) == "pndm"
    assert default_scheduler_name({"_class_name": "UniPCMultistepScheduler"}) == "euler"
    assert default_scheduler_name({}) == "euler"
    sched = make_scheduler("pndm", SD15)
    assert isinstance(sched, PNDMScheduler) and sched.config["skip_prk_steps"] is True
    assert not sched.needs_noise and sched.init_noise_sigma == 1.0


@pytest.mark.parametrize("config", [SD15, {"_class_name": "EulerDiscreteScheduler"}, {}],
                         ids=["sd15", "euler", "empty"])
def test_config_matches_diffusers(config):
    ours, ref = both(config)
    assert "clip_sample" not in ours.config and "_class_name" not in ours.config
    for key, value in ours.config.items():
        assert value == ref.config[key], key
    accepted = set(inspect.signature(diffusers.PNDMScheduler.__init__).parameters) - {"self"}
    assert set(ours.config) == accepted


@pytest.mark.parametrize("bad, match", [
    ({"prediction_type": "sample"}, "epsilon or v_prediction"),
    ({"timestep_spacing": "karras"}, "timestep_spacing"),
    ({"beta_schedule": "cubic"}, "beta_schedule"),
])
def test_rejects_unsupported_config(bad, match):
    with pytest.raises(ValueError, match=match):
        make_scheduler("pndm", {**SD15, **bad})


def test_rejects_bad_step_counts_and_early_step():
    sched = make_scheduler("pndm", SD15)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(np.zeros(SHAPE, np.float32), 1, np.zeros(SHAPE, np.float32))
    for steps, match in [(0, "at least 1"), (-2, "at least 1"), (1001, "cannot exceed")]:
        with pytest.raises(ValueError, match=match):
            sched.set_timesteps(steps)


def test_pndm_imports_and_runs_without_torch():
    result = run_without_torch("""
        import numpy as np
        from linfusion.runtime.schedulers import make_scheduler
        for skip in (True, False):
            s = make_scheduler('pndm', {'beta_schedule': 'scaled_linear', 'skip_prk_steps': skip})
            s.set_timesteps(5)
            x = np.ones((1, 4, 2, 2), np.float32)
            for t in s.timesteps:
                x = s.step(s.scale_model_input(x, t) * 0.1, t, x, noise=None)
            assert np.isfinite(x).all()
        assert_torch_free()
        print('ok')
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---- end to end: the runtime Pipeline against diffusers' StableDiffusion pipelines ------------------

PROMPT = "a watercolor painting of a fox in the snow"


def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.fixture(scope="module")
def tiny_sd_export(exported):
    from linfusion.runtime import Pipeline

    directory = exported("tiny-sd")
    config = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
    return Pipeline.from_export(directory, backend="onnxruntime"), config


@pytest.fixture(scope="module")
def tiny_sd_reference():
    from linfusion import load_pipeline

    return load_pipeline("tiny-sd").pipeline


def diffusers_pndm(config):
    return diffusers.PNDMScheduler.from_config(config)


def test_tiny_sd_defaults_to_pndm_and_matches_diffusers(tiny_sd_export, tiny_sd_reference):
    pipe, config = tiny_sd_export
    assert config["_class_name"] == "PNDMScheduler" and config["skip_prk_steps"] is True
    assert type(tiny_sd_reference.scheduler) is diffusers.PNDMScheduler
    assert default_scheduler_name(pipe.scheduler_config) == "pndm"
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 12)).astype(np.float32)
    args = {"negative_prompt": "blurry", "height": 64, "width": 96, "num_inference_steps": 8,
            "guidance_scale": 6.0}
    named = pipe(PROMPT, scheduler="pndm", latents=latents, output_type="np", **args).images
    default = pipe(PROMPT, latents=latents, output_type="np", **args).images
    euler = pipe(PROMPT, scheduler="euler", latents=latents, output_type="np", **args).images
    tiny_sd_reference.scheduler = diffusers_pndm(config)
    with torch.no_grad():
        theirs = tiny_sd_reference(PROMPT, latents=torch.from_numpy(latents), output_type="np", **args).images
    assert named.shape == theirs.shape == (1, 64, 96, 3)
    assert np.array_equal(default, named)
    assert psnr(named, theirs) >= 40
    assert psnr(euler, theirs) < psnr(named, theirs) - 3  # the default really is no longer Euler


def test_tiny_sd_prk_warmup_matches_diffusers(tiny_sd_export, tiny_sd_reference, exported):
    """skip_prk_steps=False: 12 Runge-Kutta model calls before PLMS, through the real pipeline loop."""
    from linfusion.runtime import Pipeline

    _, config = tiny_sd_export
    prk_config = {**config, "skip_prk_steps": False}
    pipe = Pipeline.from_export(exported("tiny-sd"), backend="onnxruntime")
    pipe.scheduler_config = prk_config
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    args = {"height": 64, "width": 64, "num_inference_steps": 5, "guidance_scale": 5.0}
    calls = []
    ours = pipe(PROMPT, latents=latents, output_type="np", callback=lambda i, n: calls.append(n),
                **args).images
    assert calls and calls[-1] == 5 + 9
    tiny_sd_reference.scheduler = diffusers_pndm(prk_config)
    with torch.no_grad():
        theirs = tiny_sd_reference(PROMPT, latents=torch.from_numpy(latents), output_type="np", **args).images
    assert psnr(ours, theirs) >= 40


def test_tiny_sd_img2img_with_pndm_matches_diffusers(tiny_sd_export, tiny_sd_reference):
    from PIL import Image

    pipe, config = tiny_sd_export
    y, x = np.mgrid[0:64, 0:96]
    init = Image.fromarray(np.stack([x * 255 / 96, y * 255 / 64, (x + y) % 255], axis=-1).astype(np.uint8))
    args = {"image": init, "strength": 0.6, "num_inference_steps": 10, "guidance_scale": 5.0}
    ours = pipe(PROMPT, seed=7, scheduler="pndm", output_type="np", **args).images
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**tiny_sd_reference.components)
    img2img.scheduler = diffusers_pndm(config)
    with torch.no_grad():
        generator = torch.Generator("cpu").manual_seed(7)
        theirs = img2img(PROMPT, generator=generator, output_type="np", **args).images
    assert ours.shape == theirs.shape == (1, 64, 96, 3)
    assert psnr(ours, theirs) >= 40
