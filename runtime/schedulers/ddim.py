"""DDIM with eta = 0 (Song et al. 2020): numpy port of diffusers' DDIMScheduler.

Deterministic and stateless: each step depends only on the timestep, so there is no step index.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import F32, Scheduler, check_steps, expand_to, spaced_timesteps, unsupported

DDIM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}


def original_and_epsilon(prediction_type: str, model_output: np.ndarray, sample: np.ndarray,
                         alpha_prod_t: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(x0, eps) from the model output under the variance-preserving parametrisation."""
    beta_prod_t = 1 - alpha_prod_t
    sqrt_alpha, sqrt_beta = np.sqrt(alpha_prod_t), np.sqrt(beta_prod_t)
    if prediction_type == "epsilon":
        return (sample - sqrt_beta * model_output) / sqrt_alpha, model_output
    if prediction_type == "sample":
        return model_output, (sample - sqrt_alpha * model_output) / sqrt_beta
    return sqrt_alpha * sample - sqrt_beta * model_output, sqrt_alpha * model_output + sqrt_beta * sample


def check_prediction_and_thresholding(config: dict[str, Any]) -> None:
    if config["prediction_type"] not in ("epsilon", "sample", "v_prediction"):
        raise ValueError(f"prediction_type '{config['prediction_type']}' must be epsilon, sample or v_prediction")
    if config["thresholding"]:
        raise unsupported("thresholding", True, "dynamic thresholding is not implemented")


def vp_add_noise(alphas_cumprod: np.ndarray, original_samples: np.ndarray, noise: np.ndarray,
                 timesteps: np.ndarray) -> np.ndarray:
    """sqrt(abar_t) * x + sqrt(1 - abar_t) * noise (variance-preserving forward process)."""
    alphas = alphas_cumprod.astype(original_samples.dtype, copy=False)[np.atleast_1d(np.asarray(timesteps))]
    sqrt_alpha = expand_to(np.sqrt(alphas), original_samples.ndim)
    sqrt_one_minus = expand_to(np.sqrt(1 - alphas), original_samples.ndim)
    return sqrt_alpha * original_samples + sqrt_one_minus * noise


class AlphaScheduler(Scheduler):
    """The alpha-parameterised schedulers (DDIM, LCM): integer timesteps, a final alpha_cumprod."""

    def _validate(self) -> None:
        check_prediction_and_thresholding(self._config)

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.final_alpha_cumprod = F32(1.0) if self._config["set_alpha_to_one"] else self.alphas_cumprod[0]
        n = self._config["num_train_timesteps"]
        self.timesteps = np.arange(0, n)[::-1].copy().astype(np.int64)


class DDIMScheduler(AlphaScheduler):
    """Deterministic DDIM (eta = 0), with optional x0 clipping."""

    DEFAULTS = DDIM_DEFAULTS

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self._config
        n = check_steps(num_inference_steps)
        if n > c["num_train_timesteps"]:
            raise ValueError(f"num_inference_steps ({n}) cannot exceed num_train_timesteps "
                             f"({c['num_train_timesteps']})")
        self.num_inference_steps = n
        self.timesteps = spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], n,
                                          c["steps_offset"], np.int64)

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        """x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps; ``noise`` is unused (eta = 0)."""
        self._require_timesteps()
        c = self._config
        timestep = int(timestep)
        prev_timestep = timestep - c["num_train_timesteps"] // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        out_dtype = np.result_type(np.asarray(model_output).dtype, np.asarray(sample).dtype)
        out32 = np.asarray(model_output).astype(F32, copy=False)
        sample32 = np.asarray(sample).astype(F32, copy=False)
        pred_original, pred_epsilon = original_and_epsilon(c["prediction_type"], out32, sample32, alpha_prod_t)
        if c["clip_sample"]:
            limit = c["clip_sample_range"]
            pred_original = np.clip(pred_original, -limit, limit)
        direction = np.sqrt(1 - alpha_prod_prev) * pred_epsilon
        prev = np.sqrt(alpha_prod_prev) * pred_original + direction
        return prev.astype(out_dtype, copy=False)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        return vp_add_noise(self.alphas_cumprod, original_samples, noise, timesteps)
