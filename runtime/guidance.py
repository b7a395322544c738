"""Classifier-free guidance arithmetic (pure functions)."""

from __future__ import annotations

import numpy as np


def rescale_noise_cfg(noise_cfg: np.ndarray, noise_pred_text: np.ndarray, guidance_rescale: float) -> np.ndarray:
    """Rescale guided noise towards the text prediction's std ("Common Diffusion Noise Schedules
    and Sample Steps are Flawed", section 3.4). The std is torch's default: unbiased (ddof=1)."""
    axes = tuple(range(1, noise_cfg.ndim))
    std_text = noise_pred_text.std(axis=axes, keepdims=True, ddof=1)
    std_cfg = noise_cfg.std(axis=axes, keepdims=True, ddof=1)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def combine_guidance(uncond: np.ndarray, cond: np.ndarray, scale: float, rescale: float = 0.0) -> np.ndarray:
    guided = uncond + np.float32(scale) * (cond - uncond)
    return rescale_noise_cfg(guided, cond, rescale) if rescale > 0 else guided
