"""LinFusion deployment toolchain.

``linfusion`` is the PyTorch reference (generalized linear attention on diffusers UNets);
``linfusion.export``, ``linfusion.engines`` and ``linfusion.runtime`` are the ONNX exporter, the
TensorRT engine builder and the torch-free runtime. Importing this package loads no torch: the
model API below is resolved on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "GeneralizedLinearAttention": "linfusion.attention",
    "linear_attention": "linfusion.attention",
    "LinFusion": "linfusion.checkpoint",
    "CheckpointMismatchError": "linfusion.mount",
    "ModelSourceError": "linfusion.hub",
    "PRESETS": "linfusion.presets",
    "load_pipeline": "linfusion.loader",
    "LoadedPipeline": "linfusion.loader",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'linfusion' has no attribute '{name}'")
