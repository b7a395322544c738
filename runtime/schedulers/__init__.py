"""Numpy ports of the diffusers schedulers the runtime offers, plus the CLI-name registry.

Each class is built from a ``scheduler_config.json`` dict (``X.from_config(config, **overrides)``),
matches diffusers 0.42 step for step in float32, and imports nothing but numpy. Stochastic samplers
(``needs_noise``) take the caller's standard-normal ``noise`` in ``step()`` so that a torch-compatible
generator reproduces diffusers' images.
"""

from __future__ import annotations

from typing import Any

from .base import Scheduler
from .ddim import DDIMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .lcm import LCMScheduler
from .pndm import PNDMScheduler

_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}

SCHEDULERS: dict[str, tuple[type[Scheduler], dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {**_DPMPP_2M, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {**_DPMPP_2M, "use_karras_sigmas": True}),
    "lcm": (LCMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
}

_BY_CLASS_NAME = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "LCMScheduler": "lcm",
    "PNDMScheduler": "pndm",
}

__all__ = [
    "SCHEDULERS",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "LCMScheduler",
    "PNDMScheduler",
    "Scheduler",
    "default_scheduler_name",
    "make_scheduler",
]


def make_scheduler(name: str, config: dict[str, Any]) -> Scheduler:
    """A fresh scheduler of registry ``name``, configured from the model's scheduler config."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)


def default_scheduler_name(config: dict[str, Any]) -> str:
    """The registry name matching the config's ``_class_name``.

    PNDMScheduler (the default of SD 1.x/2.x checkpoints) maps to ``pndm``, which honours the
    config's ``skip_prk_steps``; DPMSolverMultistepScheduler maps to ``dpmpp_2m_karras`` when its
    config enables Karras sigmas. A missing ``_class_name``, and any class this runtime does not
    implement (UniPC, Heun, DDPM, ...), falls back to ``euler``: a different sampler from the one the
    model ships with, so its images will not match diffusers' default for that model.
    """
    name = _BY_CLASS_NAME.get(config.get("_class_name", ""), "euler")
    if name == "dpmpp_2m" and config.get("use_karras_sigmas"):
        return "dpmpp_2m_karras"
    return name
