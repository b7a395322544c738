"""The numpy schedulers against diffusers' own (torch) schedulers as the independent reference.

Both sides run the same denoising loop with the same stand-in model (computed once in numpy and fed
to both) and, for the stochastic samplers, the same torch-generated noise stream.
"""

import math

import diffusers
import numpy as np
import pytest
import torch
from torchless import run_without_torch

from linfusion.runtime.schedulers import (
    SCHEDULERS,
    DPMSolverMultistepScheduler,
    default_scheduler_name,
    make_scheduler,
)

SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
LINEAR = {**SD15, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0}
COSINE = {**SD15, "beta_schedule": "squaredcos_cap_v2"}
ZERO_SNR = {**SD15, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}

STEPS = (1, 4, 10, 14, 15, 25, 50)
SPACINGS = ("leading", "trailing", "linspace")
BOTH = ("epsilon", "v_prediction")
SHAPE = (2, 4, 8, 8)
ATOL = 1e-5
ZERO_SNR_ATOL = 1e-4
"""Zero terminal SNR puts sigma at 4096 on the first step, where v-prediction's x0 is a difference of
nearly equal terms: torch's vectorised float32 sqrt/exp round differently on different CPUs (AVX2 vs
AVX-512 paths), and the amplified last bits measured 4.9e-5 (scaled) on a 2-core AMD EPYC
(2026-11-30), against < 1e-5 on the Intel Xeon of earlier sessions; still 20x below any visible effect.
The zero-SNR sigmas themselves (sqrt((1 - a) / a) with a near 0) agree to 3.2e-6 relative there."""
GENERIC = [n for n in SCHEDULERS if n != "pndm"]
"""PNDM (no generator, no begin index in diffusers) has its own tests: test_schedulers_pndm.py."""

# (registry name, variant label, config, prediction types, spacings)
CASES = [
    *[(name, "sd15", SD15, BOTH, SPACINGS) for name in GENERIC],
    *[(name, "linear", LINEAR, BOTH, SPACINGS) for name in GENERIC],
    *[(name, "zero-snr", ZERO_SNR, ("v_prediction",), ("trailing",)) for name in GENERIC],
    ("euler", "karras", {**SD15, "use_karras_sigmas": True}, BOTH, ("leading",)),
    ("euler", "karras-sigma-min", {**SD15, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min",
                                   "sigma_min": 0.1, "sigma_max": 10.0}, BOTH, ("linspace",)),
    ("euler", "log-linear", {**SD15, "interpolation_type": "log_linear"}, BOTH, ("leading",)),
    ("euler", "continuous-v", {**SD15, "timestep_type": "continuous"}, ("v_prediction",), ("linspace",)),
    ("euler", "sample", SD15, ("sample",), ("leading",)),
    ("euler", "trained-betas", {**SD15, "trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}, BOTH,
     ("leading",)),
    ("ddim", "trained-betas", {**SD15, "trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}, BOTH,
     ("leading",)),
    ("ddim", "clip", {**SD15, "clip_sample": True, "set_alpha_to_one": True}, ("epsilon", "sample"), SPACINGS),
    ("dpmpp_2m", "cosine", COSINE, BOTH, SPACINGS),
    ("dpmpp_2m_karras", "cosine", COSINE, BOTH, ("leading",)),
    ("dpmpp_2m", "sample", SD15, ("sample",), ("leading",)),
    ("dpmpp_2m", "sigma-min", {**SD15, "final_sigmas_type": "sigma_min"}, BOTH, ("leading", "trailing")),
    ("dpmpp_2m", "sigma-min-euler-final", {**SD15, "final_sigmas_type": "sigma_min", "euler_at_final": True},
     ("epsilon",), ("leading",)),
    ("dpmpp_2m", "no-lower-order-final", {**SD15, "final_sigmas_type": "sigma_min", "lower_order_final": False},
     ("epsilon",), ("linspace",)),
    ("lcm", "clip", {**SD15, "clip_sample": True, "original_inference_steps": 50}, ("epsilon", "sample"),
     ("leading",)),
    ("lcm", "small-scaling", {**SD15, "timestep_scaling": 0.02, "original_inference_steps": 100}, BOTH,
     ("leading",)),
]
PARAMS = [pytest.param(name, config, prediction, spacing, id=f"{name}-{label}-{prediction}-{spacing}")
          for name, label, config, predictions, spacings in CASES
          for prediction in predictions for spacing in spacings]

# Extra solver variants reached through explicit overrides rather than a registry name.
DPM_SOLVERS = [
    pytest.param({"solver_type": "heun"}, id="heun"),
    pytest.param({"solver_order": 3}, id="order3"),
    pytest.param({"solver_order": 1}, id="order1"),
    pytest.param({"solver_order": 3, "final_sigmas_type": "sigma_min", "lower_order_final": False}, id="order3-sm"),
]


def reference(name, config, **overrides):
    cls, registry_overrides = SCHEDULERS[name]
    return getattr(diffusers, cls.__name__).from_config(config, **{**registry_overrides, **overrides})


def stand_in_model(x, t, pattern):
    """A deterministic 'UNet': depends on the input and the timestep, computed in float32."""
    return (np.float32(0.3) * x + np.float32(math.cos(float(t) / 100)) * pattern).astype(np.float32)


def compare_schedules(ours, ref, label):
    ref_t = ref.timesteps.numpy()
    assert ours.timesteps.dtype == ref_t.dtype, f"{label}: timestep dtype {ours.timesteps.dtype} vs {ref_t.dtype}"
    if ref_t.dtype.kind == "f":
        np.testing.assert_allclose(ours.timesteps, ref_t, rtol=0, atol=1e-4, err_msg=f"{label}: timesteps")
    else:
        np.testing.assert_array_equal(ours.timesteps, ref_t, err_msg=f"{label}: timesteps")
    if isinstance(getattr(ref, "sigmas", None), torch.Tensor) and ref.num_inference_steps is not None:
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-5 if "zero-snr" in label else 5e-7, atol=0,
                                   err_msg=f"{label}: sigmas")
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6), f"{label}: init sigma"


def denoise_both(ours, ref, latents, begin=0, seed=0, label=""):
    """Run the same loop on both, checking every model input and every step's output."""
    pattern = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    x_ref, x_ours = torch.from_numpy(latents.copy()), latents.copy()
    ref_gen, our_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    steps = list(zip(ref.timesteps[begin:], ours.timesteps[begin:]))
    assert steps, label
    if begin == 0 and len(np.unique(ours.timesteps)) < len(ours.timesteps):
        # Repeated timesteps (Karras on cosine or zero-SNR betas) make the first-step lookup pick the
        # second copy and overrun the schedule, in diffusers too; its SDXL pipeline sets index 0 first.
        ref.set_begin_index(0)
        ours.set_begin_index(0)
    bound = ZERO_SNR_ATOL if "zero-snr" in label else ATOL
    for i, (t_ref, t_ours) in enumerate(steps):
        in_ref, in_ours = ref.scale_model_input(x_ref, t_ref), ours.scale_model_input(x_ours, t_ours)
        assert in_ours.dtype == np.float32
        assert scaled_diff(in_ours, in_ref.numpy()) <= bound, f"{label}: model input {i}"
        out_ref = torch.from_numpy(stand_in_model(in_ref.numpy(), t_ref.item(), pattern))
        out_ours = stand_in_model(in_ours, t_ours, pattern)
        noise = torch.randn(SHAPE, generator=our_gen).numpy() if ours.needs_noise else None
        x_ref = ref.step(out_ref, t_ref, x_ref, generator=ref_gen).prev_sample
        x_ours = ours.step(out_ours, t_ours, x_ours, noise=noise)
        assert x_ours.dtype == np.float32 and x_ours.shape == SHAPE
        diff = scaled_diff(x_ours, x_ref.numpy())
        assert diff <= bound, f"{label}: step {i} (t={t_ref.item()}) differs by {diff:.3g}"


def scaled_diff(ours, ref):
    """Max abs difference, divided by the reference's largest magnitude when that exceeds 1.

    float32 cannot hold 1e-5 absolute on values in the hundreds (linear betas reach sigma 157,
    zero-SNR 4096); the few last-bit differences of torch's MKL sqrt then carry through a step.
    """
    assert np.all(np.isfinite(ref)), "reference went non-finite"
    scale = max(1.0, float(np.max(np.abs(ref))))
    return float(np.max(np.abs(ours.astype(np.float64) - ref))) / scale


@pytest.mark.parametrize("name, config, prediction, spacing", PARAMS)
def test_matches_diffusers(name, config, prediction, spacing):
    config = {**config, "prediction_type": prediction, "timestep_spacing": spacing}
    latents = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for steps in STEPS:
        label = f"{name} {steps} steps" + (" zero-snr" if config.get("rescale_betas_zero_snr") else "")
        ours, ref = make_scheduler(name, config), reference(name, config)
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        compare_schedules(ours, ref, label)
        start = latents * np.float32(ours.init_noise_sigma)
        ref_start = (torch.from_numpy(latents) * ref.init_noise_sigma).numpy()
        assert scaled_diff(start, ref_start) <= ATOL
        denoise_both(ours, ref, start, label=label)


@pytest.mark.parametrize("overrides", DPM_SOLVERS)
@pytest.mark.parametrize("config", [SD15, COSINE], ids=["sd15", "cosine"])
def test_dpm_solver_variants(config, overrides):
    latents = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for prediction in BOTH:
        for steps in STEPS:
            cfg = {**config, "prediction_type": prediction, "timestep_spacing": "leading", **overrides}
            ours = DPMSolverMultistepScheduler.from_config(cfg)
            ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
            ours.set_timesteps(steps)
            ref.set_timesteps(steps)
            compare_schedules(ours, ref, f"{overrides} {steps}")
            denoise_both(ours, ref, latents, label=f"{overrides} {prediction} {steps}")


@pytest.mark.parametrize("name", GENERIC)
@pytest.mark.parametrize("steps, strength", [(10, 0.6), (25, 0.3), (4, 1.0)])
def test_img2img_matches_diffusers(name, steps, strength):
    """SDEdit as the img2img pipelines do it: skip the first steps, noise the image to the start."""
    ours, ref = make_scheduler(name, SD15), reference(name, SD15)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    init_steps = min(int(steps * strength), steps)
    t_start = max(steps - init_steps, 0) * ref.order
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start)
    ours.set_begin_index(t_start)
    rng = np.random.default_rng(2)
    image_latents = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    start_ref = ref.timesteps[t_start:t_start + 1].repeat(SHAPE[0])
    noisy_ref = ref.add_noise(torch.from_numpy(image_latents), torch.from_numpy(noise), start_ref).numpy()
    noisy_ours = ours.add_noise(image_latents, noise, np.repeat(ours.timesteps[t_start:t_start + 1], SHAPE[0]))
    assert noisy_ours.dtype == np.float32
    assert scaled_diff(noisy_ours, noisy_ref) <= ATOL
    denoise_both(ours, ref, noisy_ours, begin=t_start, seed=3, label=f"{name} img2img")


@pytest.mark.parametrize("name", GENERIC)
def test_add_noise_looks_up_timesteps(name):
    """Without a begin index, add_noise finds each timestep's own noise level."""
    ours, ref = make_scheduler(name, SD15), reference(name, SD15)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    rng = np.random.default_rng(4)
    x, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    picks = [0, 7]
    got = ours.add_noise(x, noise, ours.timesteps[picks])
    want = ref.add_noise(torch.from_numpy(x), torch.from_numpy(noise), ref.timesteps[picks]).numpy()
    assert scaled_diff(got, want) <= ATOL
    same_level = ours.add_noise(x, noise, ours.timesteps[[0, 0]])
    assert np.array_equal(got[0], same_level[0]) and not np.allclose(got[1], same_level[1])


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m"])
def test_add_noise_mid_run_uses_the_current_step(name):
    """With a begin index set, add_noise after some steps uses the step index (inpainting re-noising)."""
    ours, ref = make_scheduler(name, SD15), reference(name, SD15)
    ours.set_timesteps(12)
    ref.set_timesteps(12)
    ours.set_begin_index(2)
    ref.set_begin_index(2)
    rng = np.random.default_rng(6)
    x, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    for t_ours, t_ref in list(zip(ours.timesteps, ref.timesteps))[2:5]:
        ours.step(x, t_ours, ours.scale_model_input(x, t_ours), noise=noise)
        ref.step(torch.from_numpy(x), t_ref, ref.scale_model_input(torch.from_numpy(x), t_ref))
    got = ours.add_noise(x, noise, ours.timesteps[[0, 1]])
    want = ref.add_noise(torch.from_numpy(x), torch.from_numpy(noise), ref.timesteps[[0, 1]]).numpy()
    assert scaled_diff(got, want) <= ATOL
    at_begin = make_scheduler(name, SD15)
    at_begin.set_timesteps(12)
    at_begin.set_begin_index(2)
    assert not np.allclose(got, at_begin.add_noise(x, noise, at_begin.timesteps[[0, 1]]))


def test_dpm_learned_variance_uses_the_first_three_channels():
    cfg = {**SD15, "variance_type": "learned_range"}
    ours, ref = make_scheduler("dpmpp_2m", cfg), reference("dpmpp_2m", cfg)
    ours.set_timesteps(5)
    ref.set_timesteps(5)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    x_ref = torch.from_numpy(x.copy())
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        out = np.concatenate([0.5 * x, rng.standard_normal((1, 3, 4, 4)).astype(np.float32)], axis=1)
        x = ours.step(out, t_ours, x)
        x_ref = ref.step(torch.from_numpy(out), t_ref, x_ref).prev_sample
        assert scaled_diff(x, x_ref.numpy()) <= ATOL


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m", "lcm"])
def test_timestep_lookup_matches_diffusers(name):
    """A repeated timestep resolves to its second position; DPM maps an unknown one to the last step."""
    ours, ref = make_scheduler(name, SD15), reference(name, SD15)
    ours.set_timesteps(4)
    ref.set_timesteps(4)
    schedule = np.array([900, 700, 700, 500, 300], dtype=ours.timesteps.dtype)
    for t in (900, 700, 300):
        want = ref.index_for_timestep(torch.tensor(t, dtype=ref.timesteps.dtype), torch.from_numpy(schedule))
        assert ours.index_for_timestep(schedule.dtype.type(t), schedule) == want
    if name == "dpmpp_2m":
        assert ours.index_for_timestep(np.int64(123)) == ref.index_for_timestep(torch.tensor(123)) == 3
    else:
        with pytest.raises(ValueError, match="not one of"):
            ours.index_for_timestep(schedule.dtype.type(123))


@pytest.mark.parametrize("name", GENERIC)
def test_copy_continues_independently(name):
    """A copy taken mid-run carries the state (step index, solver history) and then diverges from it."""
    ours, ref = make_scheduler(name, SD15), reference(name, SD15)
    ours.set_timesteps(8)
    ref.set_timesteps(8)
    latents = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    pattern = np.ones(SHAPE, np.float32)
    x_ours, x_ref = latents.copy(), torch.from_numpy(latents.copy())
    our_gen, ref_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for i, (t_ours, t_ref) in enumerate(zip(ours.timesteps, ref.timesteps)):
        if i == 3:
            ours = ours.copy()
        x_in = ours.scale_model_input(x_ours, t_ours)
        noise = torch.randn(SHAPE, generator=our_gen).numpy() if ours.needs_noise else None
        x_ours = ours.step(stand_in_model(x_in, t_ours, pattern), t_ours, x_ours, noise=noise)
        r_in = ref.scale_model_input(x_ref, t_ref)
        out = torch.from_numpy(stand_in_model(r_in.numpy(), t_ref.item(), pattern))
        x_ref = ref.step(out, t_ref, x_ref, generator=ref_gen).prev_sample
    assert scaled_diff(x_ours, x_ref.numpy()) <= ATOL


@pytest.mark.parametrize("name", GENERIC)
def test_config_matches_diffusers_and_ignores_unknown_keys(name):
    ours, ref = make_scheduler(name, SD15), reference(name, SD15)
    assert "skip_prk_steps" not in ours.config and "_class_name" not in ours.config
    for key, value in ours.config.items():
        assert value == ref.config[key], key
    assert ours.order == ref.order
    assert type(ours).from_config(SD15).config == type(ours)(**SD15).config


def test_use_default_values_fall_back_to_class_defaults():
    config = {**SD15, "timestep_spacing": "leading", "_use_default_values": ["timestep_spacing"]}
    ours = make_scheduler("euler", config)
    assert ours.config["timestep_spacing"] == reference("euler", config).config["timestep_spacing"] == "linspace"


@pytest.mark.parametrize("name", GENERIC)
@pytest.mark.parametrize("steps", [0, -3])
def test_rejects_too_few_steps(name, steps):
    with pytest.raises(ValueError, match="at least 1"):
        make_scheduler(name, SD15).set_timesteps(steps)


def test_rejects_unknown_scheduler_name():
    with pytest.raises(ValueError, match=r"unknown scheduler 'heun'; choose one of euler, euler_a, ddim"):
        make_scheduler("heun", SD15)


@pytest.mark.parametrize("name, bad", [
    ("ddim", {"thresholding": True}),
    ("lcm", {"thresholding": True}),
    ("euler", {"use_exponential_sigmas": True}),
    ("euler", {"beta_schedule": "cubic"}),
    ("euler_a", {"prediction_type": "sample"}),
    ("dpmpp_2m", {"use_lu_lambdas": True}),
    ("dpmpp_2m", {"thresholding": True}),
    ("euler", {"prediction_type": "flow"}),
])
def test_rejects_unsupported_config(name, bad):
    with pytest.raises(ValueError):
        make_scheduler(name, {**SD15, **bad})


def test_dpm_rejects_other_algorithms_unless_the_registry_overrides_them():
    with pytest.raises(ValueError, match="algorithm_type"):
        DPMSolverMultistepScheduler.from_config({**SD15, "algorithm_type": "sde-dpmsolver++"})
    assert make_scheduler("dpmpp_2m", {**SD15, "algorithm_type": "sde-dpmsolver++"}).config["algorithm_type"] \
        == "dpmsolver++"


@pytest.mark.parametrize("name", ["euler_a", "lcm"])
def test_stochastic_step_requires_noise(name):
    sched = make_scheduler(name, SD15)
    sched.set_timesteps(4)
    x = np.zeros(SHAPE, np.float32)
    t = sched.timesteps[0]
    with pytest.raises(ValueError, match="noise"):
        sched.step(x, t, sched.scale_model_input(x, t))
    with pytest.raises(ValueError, match="shape"):
        sched.step(x, t, x, noise=np.zeros((1, 4, 8, 8), np.float32))


def test_lcm_last_step_needs_no_noise():
    sched = make_scheduler("lcm", SD15)
    sched.set_timesteps(2)
    assert sched.step_needs_noise(sched.timesteps[0]) and not sched.step_needs_noise(sched.timesteps[1])
    x = np.ones(SHAPE, np.float32)
    x = sched.step(x, sched.timesteps[0], x, noise=np.zeros(SHAPE, np.float32))
    assert not sched.step_needs_noise(sched.timesteps[1])
    assert sched.step(x, sched.timesteps[1], x).shape == SHAPE
    for name, expected in [("euler_a", True), ("euler", False), ("ddim", False), ("dpmpp_2m", False)]:
        other = make_scheduler(name, SD15)
        other.set_timesteps(2)
        assert other.step_needs_noise(other.timesteps[-1]) is expected is other.needs_noise


def test_euler_rejects_integer_loop_index():
    sched = make_scheduler("euler", SD15)
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="integer"):
        sched.step(np.zeros(SHAPE, np.float32), 0, np.zeros(SHAPE, np.float32))


def test_step_before_set_timesteps_fails_clearly():
    with pytest.raises(ValueError, match="set_timesteps"):
        make_scheduler("ddim", SD15).step(np.zeros(SHAPE, np.float32), 1, np.zeros(SHAPE, np.float32))


@pytest.mark.parametrize("config, expected", [
    ({"_class_name": "EulerDiscreteScheduler"}, "euler"),
    ({"_class_name": "EulerAncestralDiscreteScheduler"}, "euler_a"),
    ({"_class_name": "DDIMScheduler"}, "ddim"),
    ({"_class_name": "DPMSolverMultistepScheduler"}, "dpmpp_2m"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, "dpmpp_2m_karras"),
    ({"_class_name": "LCMScheduler"}, "lcm"),
    ({"_class_name": "PNDMScheduler"}, "pndm"),
    ({"_class_name": "UniPCMultistepScheduler"}, "euler"),
    ({}, "euler"),
])
def test_default_scheduler_name(config, expected):
    assert default_scheduler_name(config) == expected
    make_scheduler(default_scheduler_name(config), {**SD15, **config})


def test_registry_names():
    assert list(SCHEDULERS) == ["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "pndm"]
    assert make_scheduler("dpmpp_2m_karras", SD15).config["use_karras_sigmas"] is True
    assert make_scheduler("dpmpp_2m", {**SD15, "use_karras_sigmas": True}).config["use_karras_sigmas"] is False


def test_schedulers_import_without_torch():
    result = run_without_torch("""
        import numpy as np
        from linfusion.runtime.schedulers import SCHEDULERS, make_scheduler
        for name in SCHEDULERS:
            s = make_scheduler(name, {'beta_schedule': 'scaled_linear', 'beta_start': 0.00085, 'beta_end': 0.012,
                                      'skip_prk_steps': True})
            s.set_timesteps(3)
            x = np.ones((1, 4, 2, 2), np.float32)
            for t in s.timesteps:
                x = s.step(s.scale_model_input(x, t), t, x, noise=np.zeros_like(x))
        assert_torch_free()
        print('ok')
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
