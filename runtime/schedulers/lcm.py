"""Latent consistency sampling (Luo et al. 2023): numpy port of diffusers' LCMScheduler.

Each step predicts the clean latent with the consistency boundary condition and, except on the last
step, re-noises it to the next timestep, so ``step()`` needs the caller's ``noise`` there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import F32, check_steps
from .ddim import AlphaScheduler, original_and_epsilon, vp_add_noise

LCM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "original_inference_steps": 50,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
}

SIGMA_DATA = 0.5


class LCMScheduler(AlphaScheduler):
    """Multistep consistency sampler over the distillation timestep grid."""

    DEFAULTS = LCM_DEFAULTS
    needs_noise = True

    def set_timesteps(self, num_inference_steps: int, *, original_inference_steps: int | None = None,
                      strength: float = 1.0) -> None:
        """Evenly pick ``num_inference_steps`` of the ``original_inference_steps`` distillation timesteps.

        ``timestep_spacing`` is ignored, as in diffusers; ``strength`` < 1 keeps only the low-noise
        part of the grid (diffusers' LCM img2img).
        """
        c = self._config
        n = check_steps(num_inference_steps)
        n_train = c["num_train_timesteps"]
        original = original_inference_steps if original_inference_steps is not None \
            else c["original_inference_steps"]
        if original > n_train:
            raise ValueError(f"original_inference_steps ({original}) cannot exceed num_train_timesteps ({n_train})")
        if n > n_train:
            raise ValueError(f"num_inference_steps ({n}) cannot exceed num_train_timesteps ({n_train})")
        k = n_train // original
        origin = np.asarray(list(range(1, int(original * strength) + 1))) * k - 1
        if len(origin) // n < 1:
            raise ValueError(f"original_inference_steps x strength ({original} x {strength}) is smaller than "
                             f"num_inference_steps ({n})")
        if n > original:
            raise ValueError(f"num_inference_steps ({n}) cannot exceed original_inference_steps ({original})")
        origin = origin[::-1].copy()
        indices = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        self.num_inference_steps = n
        self.timesteps = origin[indices].astype(np.int64)
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        return sample

    def step_needs_noise(self, timestep: Any) -> bool:
        """Whether ``step()`` at this timestep consumes noise (every step but the last)."""
        index = self._step_index
        if index is None:
            index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        return index != self.num_inference_steps - 1

    def _boundary_scalings(self, timestep: int) -> tuple[np.float32, np.float32]:
        """c_skip, c_out of the consistency parametrisation, in float32 as for a tensor timestep."""
        scaled = F32(timestep) * F32(self._config["timestep_scaling"])
        c_skip = F32(SIGMA_DATA**2) / (scaled * scaled + F32(SIGMA_DATA**2))
        c_out = scaled / np.sqrt(scaled * scaled + F32(SIGMA_DATA**2))
        return c_skip, c_out

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        """Denoise to x0 via the boundary condition, then re-noise to the next timestep."""
        self._require_timesteps()
        c = self._config
        if self._step_index is None:
            self._init_step_index(timestep)
        timestep = int(timestep)
        last = self._step_index == self.num_inference_steps - 1
        if not last:
            noise32 = self._check_noise(noise, np.asarray(sample))
        prev_index = self._step_index + 1
        prev_timestep = int(self.timesteps[prev_index]) if prev_index < len(self.timesteps) else timestep
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        c_skip, c_out = self._boundary_scalings(timestep)
        out32 = np.asarray(model_output).astype(F32, copy=False)
        sample32 = np.asarray(sample).astype(F32, copy=False)
        pred_original, _ = original_and_epsilon(c["prediction_type"], out32, sample32, alpha_prod_t)
        if c["clip_sample"]:
            limit = c["clip_sample_range"]
            pred_original = np.clip(pred_original, -limit, limit)
        denoised = c_out * pred_original + c_skip * sample32
        if last:
            prev = denoised
        else:
            prev = np.sqrt(alpha_prod_prev) * denoised + np.sqrt(1 - alpha_prod_prev) * noise32
        self._step_index += 1
        return prev.astype(F32, copy=False)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        return vp_add_noise(self.alphas_cumprod, original_samples, noise, timesteps)
