"""DPM-Solver++ multistep (Lu et al. 2022), "DPM++ 2M": numpy port of diffusers' DPMSolverMultistepScheduler.

Only the deterministic data-prediction variant (``algorithm_type="dpmsolver++"``) is implemented, with
solver orders 1-3 and midpoint/heun second-order updates; the solver keeps the last model outputs,
so an instance is good for one generation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import (
    F32,
    SPACINGS,
    Scheduler,
    check_steps,
    exp32,
    expand_to,
    karras_sigmas,
    log32,
    sigma_to_t,
    unsupported,
)

DPM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}

UNSUPPORTED_FLAGS = ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                     "use_flow_sigmas", "use_dynamic_shifting")


def alpha_sigma(sigma: Any) -> tuple[Any, Any]:
    """(alpha_t, sigma_t) of the variance-preserving process at VE noise level sigma."""
    alpha_t = 1 / np.sqrt(sigma * sigma + 1)
    return alpha_t, sigma * alpha_t


def log_snr(sigma: np.float32) -> tuple[np.float32, np.float32, np.float32]:
    """(alpha_t, sigma_t, lambda_t = log alpha_t - log sigma_t); lambda is +inf at sigma = 0."""
    alpha_t, sigma_t = alpha_sigma(sigma)
    with np.errstate(divide="ignore"):
        return alpha_t, sigma_t, log32(alpha_t) - log32(sigma_t)


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++ (multistep, data prediction), orders 1 to 3."""

    finite_terminal_sigma = True
    DEFAULTS = DPM_DEFAULTS

    def _validate(self) -> None:
        c = self._config
        if c["algorithm_type"] == "deis":
            c["algorithm_type"] = "dpmsolver++"
        if c["solver_type"] in ("logrho", "bh1", "bh2"):
            c["solver_type"] = "midpoint"
        if c["algorithm_type"] != "dpmsolver++":
            raise unsupported("algorithm_type", c["algorithm_type"], "only dpmsolver++ is implemented")
        if c["solver_type"] not in ("midpoint", "heun"):
            raise ValueError(f"solver_type '{c['solver_type']}' must be midpoint or heun")
        if c["solver_order"] not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {c['solver_order']!r}")
        for key in UNSUPPORTED_FLAGS:
            if c[key]:
                raise unsupported(key, c[key], "not implemented in the numpy runtime")
        if c["prediction_type"] not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type '{c['prediction_type']}' must be epsilon, sample or v_prediction")
        if c["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type '{c['final_sigmas_type']}' must be zero or sigma_min")

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        ac = self.alphas_cumprod
        self.lambda_t = log32(np.sqrt(ac)) - log32(np.sqrt(1 - ac))
        self.sigmas = self._train_sigmas()
        n = self._config["num_train_timesteps"]
        self.timesteps = np.linspace(0, n - 1, n, dtype=F32)[::-1].copy()
        self.model_outputs: list[np.ndarray | None] = [None] * self._config["solver_order"]
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self._config
        n = check_steps(num_inference_steps)
        n_train = c["num_train_timesteps"]
        clipped_idx = int(np.searchsorted(np.flip(self.lambda_t), c["lambda_min_clipped"]))
        last_timestep = n_train - clipped_idx
        spacing = c["timestep_spacing"]
        if spacing == "linspace":
            timesteps = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif spacing == "leading":
            step_ratio = last_timestep // (n + 1)
            timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += c["steps_offset"]
        elif spacing == "trailing":
            step_ratio = n_train / n
            timesteps = np.arange(last_timestep, 0, -step_ratio).round().copy().astype(np.int64)
            timesteps -= 1
        else:
            raise ValueError(f"timestep_spacing '{spacing}' is not supported; choose one of {', '.join(SPACINGS)}")
        train_sigmas = self._train_sigmas()
        log_sigmas = np.log(train_sigmas)
        if c["use_karras_sigmas"]:
            descending = np.flip(train_sigmas).copy()
            sigmas = karras_sigmas(descending[-1].item(), descending[0].item(), n)
            timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
            if c["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        if c["final_sigmas_type"] == "sigma_min":
            ac0 = self.alphas_cumprod[0]
            sigma_last = np.sqrt((1 - ac0) / ac0)
        else:
            sigma_last = 0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(F32)
        self.timesteps = timesteps.astype(np.int64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * c["solver_order"]
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: Any, schedule_timesteps: np.ndarray | None = None) -> int:
        """As the base class, but an unknown timestep maps to the last step (diffusers' fallback)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        candidates = np.flatnonzero(schedule == np.asarray(timestep))
        if len(candidates) == 0:
            return len(self.timesteps) - 1
        return int(candidates[1] if len(candidates) > 1 else candidates[0])

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        return sample

    def _data_prediction(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """x0 predicted from the model output at the current step."""
        c = self._config
        if c["prediction_type"] == "sample":
            return model_output
        alpha_t, sigma_t = alpha_sigma(self.sigmas[self._step_index])
        if c["prediction_type"] == "epsilon":
            if c["variance_type"] in ("learned", "learned_range"):
                model_output = model_output[:, :3]
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output

    def _first_order(self, x0: np.ndarray, sample: np.ndarray) -> np.ndarray:
        i = self._step_index
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[i + 1])
        _, sigma_s, lambda_s = log_snr(self.sigmas[i])
        h = lambda_t - lambda_s
        return (sigma_t / sigma_s) * sample - (alpha_t * (exp32(-h) - 1.0)) * x0

    def _second_order(self, sample: np.ndarray) -> np.ndarray:
        i = self._step_index
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[i + 1])
        _, sigma_s0, lambda_s0 = log_snr(self.sigmas[i])
        _, _, lambda_s1 = log_snr(self.sigmas[i - 1])
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        if self._config["solver_type"] == "midpoint":
            return ((sigma_t / sigma_s0) * sample - (alpha_t * (exp32(-h) - 1.0)) * d0
                    - 0.5 * (alpha_t * (exp32(-h) - 1.0)) * d1)
        return ((sigma_t / sigma_s0) * sample - (alpha_t * (exp32(-h) - 1.0)) * d0
                + (alpha_t * ((exp32(-h) - 1.0) / h + 1.0)) * d1)

    def _third_order(self, sample: np.ndarray) -> np.ndarray:
        i = self._step_index
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[i + 1])
        _, sigma_s0, lambda_s0 = log_snr(self.sigmas[i])
        _, _, lambda_s1 = log_snr(self.sigmas[i - 1])
        _, _, lambda_s2 = log_snr(self.sigmas[i - 2])
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        return ((sigma_t / sigma_s0) * sample - (alpha_t * (exp32(-h) - 1.0)) * m0
                + (alpha_t * ((exp32(-h) - 1.0) / h + 1.0)) * d1
                - (alpha_t * ((exp32(-h) - 1.0 + h) / (h * h) - 0.5)) * d2)

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        """One multistep update; the order drops to 1 at the start and, per config, at the end."""
        self._require_timesteps()
        c = self._config
        if self._step_index is None:
            self._init_step_index(timestep)
        count = len(self.timesteps)
        few_steps = c["lower_order_final"] and count < 15
        lower_order_final = self._step_index == count - 1 and (
            c["euler_at_final"] or few_steps or c["final_sigmas_type"] == "zero")
        lower_order_second = self._step_index == count - 2 and few_steps
        x0 = self._data_prediction(np.asarray(model_output).astype(F32, copy=False),
                                   np.asarray(sample).astype(F32, copy=False))
        self.model_outputs = self.model_outputs[1:] + [x0]
        sample32 = np.asarray(sample).astype(F32, copy=False)
        order = c["solver_order"]
        if order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev = self._first_order(x0, sample32)
        elif order == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev = self._second_order(sample32)
        else:
            prev = self._third_order(sample32)
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        self._step_index += 1
        return prev.astype(np.asarray(model_output).dtype, copy=False)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        """alpha_t * x + sigma_t * noise at each timestep's sigma."""
        sigmas = self.sigmas.astype(original_samples.dtype, copy=False)
        sigma = expand_to(sigmas[self._noise_indices(timesteps)], original_samples.ndim)
        alpha_t, sigma_t = alpha_sigma(sigma)
        return alpha_t * original_samples + sigma_t * noise
