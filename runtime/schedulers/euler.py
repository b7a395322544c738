"""Euler (Karras et al. 2022, Algorithm 2 without churn): numpy port of diffusers' EulerDiscreteScheduler."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import (
    F32,
    Scheduler,
    check_steps,
    exp32,
    expand_to,
    karras_sigmas,
    log32,
    sigma_to_t,
    spaced_timesteps,
    torch_linspace_f32,
    unsupported,
)

EULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_spacing": "linspace",
    "timestep_type": "discrete",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
}


def noise_sigma(sigmas: np.ndarray, spacing: str) -> float:
    """Std of the starting noise: the largest sigma, or sqrt(sigma^2 + 1) for "leading" spacing."""
    top = sigmas.max()
    return float(top if spacing in ("linspace", "trailing") else np.sqrt(top * top + 1))


def scale_by_sigma(sample: np.ndarray, sigma: np.float32) -> np.ndarray:
    """Divide the model input by sqrt(sigma^2 + 1) so the UNet sees unit-variance latents."""
    return (sample / np.sqrt(sigma * sigma + 1)).astype(sample.dtype, copy=False)


def predict_original(prediction_type: str, model_output: np.ndarray, sample: np.ndarray,
                     sigma: np.float32) -> np.ndarray:
    """x0 from the model output at noise level sigma (variance-exploding parametrisation)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / np.sqrt(sigma * sigma + 1)) + sample / (sigma * sigma + 1)
    return model_output


def reject_integer_timestep(timestep: Any) -> None:
    """diffusers refuses loop indices here; a float schedule value is expected."""
    if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
        raise ValueError(  # noqa: TRY004 - diffusers raises ValueError here
            "pass one of scheduler.timesteps as the timestep, not an integer loop index")


class SigmaScheduler(Scheduler):
    """The sigma-parameterised (k-diffusion style) schedulers: x_t = x_0 + sigma_t * noise.

    Subclasses set ``self.sigmas`` (one per timestep, plus the final one) in set_timesteps.
    """

    sigmas: np.ndarray
    finite_terminal_sigma = True

    @property
    def init_noise_sigma(self) -> float:  # type: ignore[override]
        return noise_sigma(self.sigmas, self._config["timestep_spacing"])

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        if self._step_index is None:
            self._init_step_index(timestep)
        return scale_by_sigma(sample, self.sigmas[self._step_index])

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        """x + sigma_t * noise (variance-exploding forward process)."""
        sigmas = self.sigmas.astype(original_samples.dtype, copy=False)
        sigma = expand_to(sigmas[self._noise_indices(timesteps)], original_samples.ndim)
        return original_samples + noise * sigma


class EulerDiscreteScheduler(SigmaScheduler):
    """Deterministic Euler sampler over the sigmas of a discrete-time diffusion model."""

    DEFAULTS = EULER_DEFAULTS

    def _validate(self) -> None:
        c = self._config
        for key in ("use_exponential_sigmas", "use_beta_sigmas"):
            if c[key]:
                raise unsupported(key, c[key], "only Karras sigmas are implemented")
        if c["prediction_type"] not in ("epsilon", "v_prediction", "sample", "original_sample"):
            raise ValueError(f"prediction_type '{c['prediction_type']}' must be epsilon, v_prediction or sample")
        if c["interpolation_type"] not in ("linear", "log_linear"):
            raise ValueError(f"interpolation_type '{c['interpolation_type']}' must be linear or log_linear")
        if c["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type '{c['final_sigmas_type']}' must be zero or sigma_min")
        if c["timestep_type"] not in ("discrete", "continuous"):
            raise ValueError(f"timestep_type '{c['timestep_type']}' must be discrete or continuous")

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        n = self._config["num_train_timesteps"]
        self.sigmas = np.concatenate([self._train_sigmas()[::-1], np.zeros(1, F32)]).astype(F32)
        self.timesteps = np.linspace(0, n - 1, n, dtype=float)[::-1].astype(F32)
        self._continuous_v = (self._config["timestep_type"] == "continuous"
                              and self._config["prediction_type"] == "v_prediction")

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Pick the inference timesteps and their sigmas (Karras-spaced if configured)."""
        c = self._config
        n = check_steps(num_inference_steps)
        self.num_inference_steps = n
        timesteps = spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], n, c["steps_offset"], F32)
        train_sigmas = self._train_sigmas()
        log_sigmas = np.log(train_sigmas)
        if c["interpolation_type"] == "linear":
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        else:
            ramp = torch_linspace_f32(float(np.log(train_sigmas[-1])), float(np.log(train_sigmas[0])), n + 1)
            sigmas = exp32(ramp)
        if c["use_karras_sigmas"]:
            lo = c["sigma_min"] if c["sigma_min"] is not None else sigmas[-1].item()
            hi = c["sigma_max"] if c["sigma_max"] is not None else sigmas[0].item()
            sigmas = karras_sigmas(lo, hi, n)
            timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
        if c["final_sigmas_type"] == "sigma_min":
            ac0 = self.alphas_cumprod[0]
            sigma_last = np.sqrt((1 - ac0) / ac0)
        else:
            sigma_last = 0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(F32)
        if self._continuous_v:
            self.timesteps = F32(0.25) * log32(self.sigmas[:-1])
        else:
            self.timesteps = timesteps.astype(F32)
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        """One Euler step from sigma_i to sigma_{i+1}; ``noise`` is unused (no churn)."""
        reject_integer_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        sample32 = np.asarray(sample).astype(F32, copy=False)
        out32 = np.asarray(model_output).astype(F32, copy=False)
        sigma = self.sigmas[self._step_index]
        sigma_hat = sigma * F32(1.0)
        pred = predict_original(self._config["prediction_type"], out32, sample32, sigma)
        derivative = (sample32 - pred) / sigma_hat
        dt = self.sigmas[self._step_index + 1] - sigma_hat
        prev = sample32 + derivative * dt
        self._step_index += 1
        return prev.astype(np.asarray(model_output).dtype, copy=False)
