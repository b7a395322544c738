"""Shared pieces of the numpy schedulers: config handling, noise schedules and step bookkeeping.

The arrays diffusers builds with torch on the CPU are rebuilt here with numpy so that they come out
bit for bit the same where torch's kernels allow it: ``torch.linspace`` (a fused multiply-add from
either end), ``torch.cumprod`` (accumulates float32 in float64) and the float32 elementwise maths.
Where torch calls a vendor math library (``sqrt``/``log``/``exp`` through MKL or Sleef) results may
differ in the last bit; correctly rounded float32 results are used instead, which agree with torch far
more often than numpy's fast float32 ``log``/``exp``.
"""

from __future__ import annotations

import copy as _copy
import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from typing_extensions import Self

F32 = np.float32

SPACINGS = ("linspace", "leading", "trailing")


def log32(x: Any) -> Any:
    """float32 natural log, correctly rounded: torch's float32 log is, numpy's SIMD one is not."""
    return np.log(np.asarray(x, dtype=np.float64)).astype(F32)[()]


def exp32(x: Any) -> Any:
    """float32 exp, correctly rounded (see ``log32``)."""
    return np.exp(np.asarray(x, dtype=np.float64)).astype(F32)[()]


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` as torch's CPU kernel computes it.

    Torch rounds start, end and step to float32, fills the first half as ``start + step * i`` and the
    second half as ``end - step * (steps - 1 - i)``, each as one fused multiply-add; float64 holds the
    exact product, so one rounding to float32 reproduces it.
    """
    if steps == 1:
        return np.array([start], dtype=F32)
    lo, hi = F32(start), F32(end)
    step = F32((hi - lo) / F32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    first = np.float64(lo) + np.float64(step) * idx
    second = np.float64(hi) - np.float64(step) * (steps - 1 - idx)
    return np.where(idx < steps // 2, first, second).astype(F32)


def cumprod_f32(values: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 vector: the running product is kept in float64."""
    return np.cumprod(values.astype(np.float64)).astype(F32)


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The cosine ("squaredcos_cap_v2") schedule, computed in Python floats as diffusers does."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=F32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (arXiv:2305.08891, Algorithm 1), in float32 like diffusers."""
    alphas_bar_sqrt = np.sqrt(cumprod_f32(F32(1.0) - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = alphas_bar_sqrt - last
    alphas_bar_sqrt = alphas_bar_sqrt * (first / (first - last))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (F32(1.0) - alphas).astype(F32)


def make_betas(config: dict[str, Any]) -> np.ndarray:
    """The training betas a config describes (``trained_betas`` wins, as in diffusers)."""
    n = int(config["num_train_timesteps"])
    schedule = config["beta_schedule"]
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=F32)
    elif schedule == "linear":
        betas = torch_linspace_f32(config["beta_start"], config["beta_end"], n)
    elif schedule == "scaled_linear":
        root = torch_linspace_f32(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n)
        betas = root * root
    elif schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(n)
    else:
        raise ValueError(f"beta_schedule '{schedule}' is not supported; use linear, scaled_linear, "
                         "squaredcos_cap_v2 or trained_betas")
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def sigma_to_t(sigma: Any, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of a sigma, by interpolating in log-sigma (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(np.shape(sigma))


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int,
                  rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels, float64 like diffusers' ``_convert_to_karras``."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def resolve_config(defaults: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with the config's known keys; private (``_x``) and foreign keys are ignored.

    Keys a saved diffusers config lists in ``_use_default_values`` fall back to this class's
    defaults, as ``ConfigMixin.from_config`` does.
    """
    used_defaults = set(config.get("_use_default_values") or ())
    resolved = dict(defaults)
    for key, value in config.items():
        if key in defaults and key not in used_defaults:
            resolved[key] = value
    return resolved


def spaced_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int,
                     steps_offset: int, dtype: type) -> np.ndarray:
    """The Euler-family timestep grids of arXiv:2305.08891, Table 2, with diffusers' rounding."""
    n_train, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        if dtype is np.int64:
            return np.linspace(0, n_train - 1, n).round()[::-1].copy().astype(np.int64)
        return np.linspace(0, n_train - 1, n, dtype=F32)[::-1].copy()
    if spacing == "leading":
        step_ratio = n_train // n
        timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(dtype)
        timesteps += steps_offset
        return timesteps
    if spacing == "trailing":
        step_ratio = n_train / n
        timesteps = np.arange(n_train, 0, -step_ratio).round().copy().astype(dtype)
        timesteps -= 1
        return timesteps
    raise ValueError(f"timestep_spacing '{spacing}' is not supported; choose one of {', '.join(SPACINGS)}")


def check_steps(num_inference_steps: int) -> int:
    """Reject a step count below one (diffusers fails later and less clearly)."""
    if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps:
        raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    return int(num_inference_steps)


def expand_to(values: np.ndarray, ndim: int) -> np.ndarray:
    """Per-batch scalars shaped to broadcast against a batch of samples."""
    values = np.asarray(values).reshape(-1)
    return values.reshape(values.shape + (1,) * (ndim - 1))


def unsupported(name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{name}={value!r} is not supported by the numpy runtime scheduler ({why})")


class Scheduler:
    """Config handling and step-index bookkeeping shared by all schedulers.

    An instance holds one generation's state (step index, solver history); use ``copy()`` or build a
    fresh one from the config for each generation.
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {}
    order: int = 1
    needs_noise: bool = False
    init_noise_sigma: float = 1.0
    finite_terminal_sigma: bool = False
    """Sigma-based schedulers: with zero-terminal-SNR betas, the last sigma would be infinite, so
    diffusers clamps the final alpha_cumprod to 2^-24; DDIM and LCM keep it at zero."""

    def __init__(self, **config: Any) -> None:
        self._config = resolve_config(self.DEFAULTS, config)
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._validate()
        self.betas = make_betas(self._config)
        self.alphas_cumprod = cumprod_f32(F32(1.0) - self.betas)
        if self.finite_terminal_sigma and self._config.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = F32(2.0**-24)

    def _validate(self) -> None:
        """Reject config values this numpy port does not implement."""

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> Self:
        """Build from a ``scheduler_config.json`` dict; ``overrides`` win over the config."""
        merged = resolve_config(cls.DEFAULTS, dict(config))
        merged.update(overrides)
        return cls(**merged)

    @property
    def config(self) -> dict[str, Any]:
        """The effective config: this class's defaults overlaid with what was given."""
        return dict(self._config)

    def copy(self) -> Self:
        """An independent copy, state included."""
        return _copy.deepcopy(self)

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def step_needs_noise(self, timestep: Any) -> bool:
        """Whether ``step()`` at this timestep consumes ``noise`` (diffusers draws it only then)."""
        return self.needs_noise

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start stepping at this index of ``timesteps`` (img2img skips the first ones)."""
        self._begin_index = int(begin_index)

    def _train_sigmas(self) -> np.ndarray:
        ac = self.alphas_cumprod
        return np.sqrt((F32(1.0) - ac) / ac)

    def index_for_timestep(self, timestep: Any, schedule_timesteps: np.ndarray | None = None) -> int:
        """Position of ``timestep`` in the schedule; the second match when it occurs twice."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = np.flatnonzero(schedule == np.asarray(timestep))
        if len(indices) == 0:
            raise ValueError(f"timestep {timestep!r} is not one of this scheduler's timesteps")
        return int(indices[1] if len(indices) > 1 else indices[0])

    def _init_step_index(self, timestep: Any) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step()")

    def _noise_indices(self, timesteps: np.ndarray) -> list[int]:
        """Which sigma ``add_noise`` uses per timestep, by diffusers' rules for indexed schedulers."""
        timesteps = np.atleast_1d(np.asarray(timesteps))
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * timesteps.shape[0]

    @staticmethod
    def _check_noise(noise: np.ndarray | None, sample: np.ndarray) -> np.ndarray:
        if noise is None:
            raise ValueError("this scheduler's step() needs `noise` (a standard-normal array like the sample)")
        noise = np.asarray(noise)
        if noise.shape != sample.shape:
            raise ValueError(f"noise has shape {noise.shape}, the sample {sample.shape}")
        return noise.astype(F32, copy=False)

    def __len__(self) -> int:
        return int(self._config["num_train_timesteps"])
