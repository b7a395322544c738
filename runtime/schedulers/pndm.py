"""Pseudo numerical methods (Liu et al. 2022, arXiv:2202.09778): numpy port of diffusers' PNDMScheduler.

With ``skip_prk_steps`` (Stable Diffusion's setting) it is PLMS, the linear multistep sampler of the
latent-diffusion repository; otherwise four Runge-Kutta steps (12 model calls) warm up the history
before PLMS takes over. Both follow diffusers 0.42 literally, quirks included:

- the PLMS schedule repeats its second timestep: the first step is an Euler step to it, the second
  redoes that step from the same sample with the average of both model outputs (a Heun step), and
  the schedule has ``num_inference_steps + 1`` entries; the PRK schedule has ``num_inference_steps + 9``;
- the state is a step counter and a history of model outputs (``ets``), not a position in the
  schedule: ``set_begin_index`` does not change what a step does (diffusers' PNDM has no begin index),
  so an img2img run that starts part-way through simply starts the counter there, as diffusers does;
- step sizes are ``num_train_timesteps // num_inference_steps`` whatever the spacing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import F32, SPACINGS, Scheduler, check_steps
from .ddim import vp_add_noise

PNDM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "skip_prk_steps": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
}

PNDM_ORDER = 4
"""Runge-Kutta warm-up steps before the 4th-order multistep formula has its history."""


def ascending_timesteps(spacing: str, num_train_timesteps: int, n: int, steps_offset: int) -> np.ndarray:
    """PNDM's inference grid in increasing order, rounded as diffusers' PNDMScheduler rounds it."""
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, n).round().astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (num_train_timesteps // n)).astype(np.int64) + steps_offset
    step_ratio = num_train_timesteps / n
    return np.round(np.arange(num_train_timesteps, 0, -step_ratio))[::-1].astype(np.int64) - 1


class PNDMScheduler(Scheduler):
    """PLMS, optionally warmed up with pseudo Runge-Kutta steps; deterministic (no noise)."""

    DEFAULTS = PNDM_DEFAULTS

    def _validate(self) -> None:
        c = self._config
        if c["prediction_type"] not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type '{c['prediction_type']}' must be epsilon or v_prediction "
                             "for PNDM")
        if c["timestep_spacing"] not in SPACINGS:
            raise ValueError(f"timestep_spacing '{c['timestep_spacing']}' is not supported; "
                             f"choose one of {', '.join(SPACINGS)}")

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.final_alpha_cumprod = F32(1.0) if self._config["set_alpha_to_one"] else self.alphas_cumprod[0]
        n = self._config["num_train_timesteps"]
        self.timesteps = np.arange(0, n)[::-1].copy().astype(np.int64)
        self.prk_timesteps = np.zeros(0, np.int64)
        self.plms_timesteps = self.timesteps
        self._reset()

    def _reset(self) -> None:
        self.counter = 0
        self.ets: list[np.ndarray] = []
        self.cur_model_output: np.ndarray | None = None
        self.cur_sample: np.ndarray | None = None

    @property
    def step_index(self) -> int | None:
        """Position in ``timesteps`` of the next step: the begin index plus the steps taken."""
        if self.num_inference_steps is None:
            return None
        return (self._begin_index or 0) + self.counter

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self._config
        n = check_steps(num_inference_steps)
        n_train = c["num_train_timesteps"]
        if n > n_train:
            raise ValueError(f"num_inference_steps ({n}) cannot exceed num_train_timesteps ({n_train})")
        if not c["skip_prk_steps"] and n < PNDM_ORDER:
            raise ValueError(f"PNDM with skip_prk_steps=False needs at least {PNDM_ORDER} inference steps, "
                             f"got {n}; use more steps or skip_prk_steps=True")
        grid = ascending_timesteps(c["timestep_spacing"], n_train, n, c["steps_offset"])
        if c["skip_prk_steps"]:
            # PLMS: [t_{n-1}, t_{n-2}, t_{n-2}, t_{n-3}, ..., t_0]; the repeat is the Heun warm-up step.
            self.prk_timesteps = np.zeros(0, np.int64)
            self.plms_timesteps = np.concatenate([grid[:-1], grid[-2:-1], grid[-1:]])[::-1].copy()
        else:
            # Four RK4 steps over the four highest timesteps, each through its midpoint (t + half):
            # the (t, t+h) pairs, every entry but the ends doubled, highest first.
            half = n_train // n // 2
            pairs = np.repeat(grid[-PNDM_ORDER:], 2) + np.tile(np.array([0, half]), PNDM_ORDER)
            self.prk_timesteps = np.repeat(pairs[:-1], 2)[1:-1][::-1].copy()
            self.plms_timesteps = grid[:-3][::-1].copy()
        self.timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self.num_inference_steps = n
        self._begin_index = None
        self._reset()

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        """One PRK or PLMS step, chosen by the step counter; ``noise`` is unused (deterministic)."""
        self._require_timesteps()
        out_dtype = np.result_type(np.asarray(model_output).dtype, np.asarray(sample).dtype)
        out32 = np.asarray(model_output).astype(F32, copy=False)
        sample32 = np.asarray(sample).astype(F32, copy=False)
        if self.counter < len(self.prk_timesteps) and not self._config["skip_prk_steps"]:
            prev = self._step_prk(out32, int(timestep), sample32)
        else:
            prev = self._step_plms(out32, int(timestep), sample32)
        return prev.astype(out_dtype, copy=False)

    def _step_prk(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """Runge-Kutta: model calls at t, the midpoint twice and the end, combined 1/6, 1/3, 1/3, 1/6."""
        half = self._config["num_train_timesteps"] // self.num_inference_steps // 2
        prev_timestep = timestep - (0 if self.counter % 2 else half)
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])
        phase = self.counter % 4
        if phase == 0:
            self.cur_model_output = F32(1 / 6) * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif phase in (1, 2):
            self.cur_model_output = self.cur_model_output + F32(1 / 3) * model_output
        else:
            model_output = self.cur_model_output + F32(1 / 6) * model_output
            self.cur_model_output = None
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev = self._prev_sample(cur_sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev

    def _step_plms(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """Adams-Bashforth on the model outputs (orders 1 to 4 as the history fills)."""
        if not self._config["skip_prk_steps"] and len(self.ets) < 3:
            raise ValueError("PNDM's PLMS steps need the 12 Runge-Kutta steps first (skip_prk_steps=False); "
                             "step through all of scheduler.timesteps from the start")
        ratio = self._config["num_train_timesteps"] // self.num_inference_steps
        prev_timestep = timestep - ratio
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            # The repeated timestep: redo the first step, from the same sample, with averaged outputs.
            prev_timestep = timestep
            timestep = timestep + ratio
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / F32(2)
            sample = self.cur_sample
            self.cur_sample = None
        elif len(ets) == 2:
            model_output = (F32(3) * ets[-1] - ets[-2]) / F32(2)
        elif len(ets) == 3:
            model_output = (F32(23) * ets[-1] - F32(16) * ets[-2] + F32(5) * ets[-3]) / F32(12)
        else:
            model_output = F32(1 / 24) * (F32(55) * ets[-1] - F32(59) * ets[-2] + F32(37) * ets[-3]
                                          - F32(9) * ets[-4])
        prev = self._prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev

    def _prev_sample(self, sample: np.ndarray, timestep: int, prev_timestep: int,
                     model_output: np.ndarray) -> np.ndarray:
        """x_{t-delta} from x_t and an eps estimate: formula (9) of the PNDM paper."""
        alpha_t = self.alphas_cumprod[timestep]
        alpha_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_t = F32(1) - alpha_t
        beta_prev = F32(1) - alpha_prev
        if self._config["prediction_type"] == "v_prediction":
            model_output = np.sqrt(alpha_t) * model_output + np.sqrt(beta_t) * sample
        sample_coeff = np.sqrt(alpha_prev / alpha_t)
        denom = alpha_t * np.sqrt(beta_prev) + np.sqrt(alpha_t * beta_t * alpha_prev)
        return sample_coeff * sample - (alpha_prev - alpha_t) * model_output / denom

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        """sqrt(abar_t) x + sqrt(1 - abar_t) noise at the given (integer) timesteps, as DDPM does."""
        return vp_add_noise(self.alphas_cumprod, original_samples, noise, timesteps)
