"""``linfusion-serve``: an HTTP service on the torch-free runtime (the ``serve`` extra).

OpenAI-compatible ``/v1/images/generations``, the AUTOMATIC1111 ``/sdapi/v1`` subset, probes and
Prometheus metrics, with dynamic batching, back-pressure, limits, bearer-token auth and draining on
SIGTERM. Built on FastAPI, uvicorn and prometheus-client; the runtime never imports this package and
this package never imports torch. ``linfusion.serve.ray`` runs the same app on Ray Serve.

    from linfusion.serve import ServeConfig, create_app
    app = create_app(ServeConfig("exports/sd15"))   # any ASGI server can run it
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "ServeConfig": "linfusion.serve.config",
    "create_app": "linfusion.serve.app",
    "Service": "linfusion.serve.service",
    "main": "linfusion.serve.cli",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'linfusion.serve' has no attribute '{name}'")
