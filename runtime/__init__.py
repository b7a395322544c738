"""Torch-free runtime: reads an export directory and generates images with numpy and ONNX Runtime.

This is the bottom layer. It owns the export manifest schema and imports nothing from
``linfusion`` (the PyTorch model), ``linfusion.export`` or ``linfusion.engines``; importing it
loads neither torch nor onnxruntime (the API below resolves on first use).
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "Pipeline": "linfusion.runtime.pipeline",
    "PipelineOutput": "linfusion.runtime.pipeline",
    "GenerationError": "linfusion.runtime.pipeline",
    "Manifest": "linfusion.runtime.manifest",
    "ManifestError": "linfusion.runtime.manifest",
    "load_manifest": "linfusion.runtime.manifest",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'linfusion.runtime' has no attribute '{name}'")
