"""Euler ancestral: numpy port of diffusers' EulerAncestralDiscreteScheduler.

Each step lands on a lower noise level sigma_down and then adds fresh noise of std sigma_up, so
``step()`` needs the caller's standard-normal ``noise`` (drawn where diffusers draws it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import F32, check_steps, spaced_timesteps, unsupported
from .euler import SigmaScheduler, predict_original, reject_integer_timestep

EULER_ANCESTRAL_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Ancestral (stochastic) Euler sampler; needs one noise draw per step."""

    DEFAULTS = EULER_ANCESTRAL_DEFAULTS
    needs_noise = True

    def _validate(self) -> None:
        prediction = self._config["prediction_type"]
        if prediction == "sample":
            raise unsupported("prediction_type", prediction, "diffusers does not implement it for Euler ancestral")
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type '{prediction}' must be epsilon or v_prediction")

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        n = self._config["num_train_timesteps"]
        self.sigmas = np.concatenate([self._train_sigmas()[::-1], [0.0]]).astype(F32)
        self.timesteps = np.linspace(0, n - 1, n, dtype=float)[::-1].copy()

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self._config
        n = check_steps(num_inference_steps)
        self.num_inference_steps = n
        timesteps = spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], n, c["steps_offset"], F32)
        train_sigmas = self._train_sigmas()
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self.timesteps = timesteps
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        """Deterministic step to sigma_down, then ``noise * sigma_up`` on top."""
        reject_integer_timestep(timestep)
        noise32 = self._check_noise(noise, np.asarray(sample))
        if self._step_index is None:
            self._init_step_index(timestep)
        sample32 = np.asarray(sample).astype(F32, copy=False)
        out32 = np.asarray(model_output).astype(F32, copy=False)
        sigma_from = self.sigmas[self._step_index]
        sigma_to = self.sigmas[self._step_index + 1]
        pred = predict_original(self._config["prediction_type"], out32, sample32, sigma_from)
        sq_from, sq_to = sigma_from * sigma_from, sigma_to * sigma_to
        sigma_up = np.sqrt(sq_to * (sq_from - sq_to) / sq_from)
        sigma_down = np.sqrt(sq_to - sigma_up * sigma_up)
        derivative = (sample32 - pred) / sigma_from
        prev = sample32 + derivative * (sigma_down - sigma_from)
        prev = prev + noise32 * sigma_up
        self._step_index += 1
        return prev.astype(np.asarray(model_output).dtype, copy=False)
