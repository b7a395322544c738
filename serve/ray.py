"""linfusion-serve on Ray Serve: the same FastAPI app (every endpoint, batching, limits, auth) per replica.

Each replica loads one Pipeline in its constructor (Ray routes to a replica only once that returns)
and runs the app built by ``create_app`` as its ASGI ingress, so a replica behaves exactly like one
``linfusion-serve`` process; Ray Serve adds replicas, autoscaling and per-replica resources.

From the shell (arguments are strings, converted here)::

    serve run linfusion.serve.ray:app_builder directory=exports/sd15 num_replicas=2 num_gpus=1

From Python::

    from ray import serve
    from linfusion.serve.ray import build
    serve.run(build({"directory": "exports/sd15", "max_batch": 4}, num_replicas=2, num_gpus=1))

Metrics (/metrics) and /sdapi/v1/progress describe the replica that answers; Ray's own metrics
cover the cluster. ``drain_timeout`` becomes Ray's graceful_shutdown_timeout_s.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ray import serve

from .config import API_KEY_ENV, ServeConfig

INT_FIELDS = {f.name for f in fields(ServeConfig) if f.type in ("int", int)}
FLOAT_FIELDS = {f.name for f in fields(ServeConfig) if f.type in ("float", float)}


@serve.deployment
@serve.ingress()
class LinFusionDeployment:
    """One replica: a loaded Pipeline, its batcher, and the linfusion-serve app."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from linfusion.runtime import Pipeline

        from .service import Service

        self.config = config_from(settings)
        pipe = Pipeline.from_export(self.config.directory, backend=self.config.backend, verify=self.config.verify,
                                    intra_op_threads=self.config.threads, cache_dir=self.config.cache)
        self.service = Service(self.config, pipeline=pipe)

    def __serve_build_asgi_app__(self) -> Any:
        from .app import create_app

        return create_app(self.config, self.service)

    def check_health(self) -> None:
        """Ray's health check: a replica whose worker thread died is restarted."""
        thread = self.service.batcher._thread
        if thread is not None and not thread.is_alive() and not self.service.draining:
            raise RuntimeError("the model worker thread stopped")


def config_from(settings: dict[str, Any]) -> ServeConfig:
    """A ServeConfig from keyword settings (strings from ``serve run`` are converted)."""
    import os
    from pathlib import Path

    values = dict(settings)
    key_file = values.pop("api_key_file", None)
    if key_file:
        values["api_key"] = Path(key_file).read_text().strip()
    elif "api_key" not in values and os.environ.get(API_KEY_ENV) is not None:
        values["api_key"] = os.environ[API_KEY_ENV].strip()
    known = {f.name for f in fields(ServeConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown linfusion-serve setting(s) {', '.join(unknown)}; use {', '.join(sorted(known))}")
    for name in INT_FIELDS & set(values):
        values[name] = int(values[name])
    for name in FLOAT_FIELDS & set(values):
        values[name] = float(values[name])
    if isinstance(values.get("verify"), str):
        values["verify"] = values["verify"].lower() not in ("0", "false", "no")
    return ServeConfig(**values).check()


def build(settings: dict[str, Any] | ServeConfig, num_replicas: int | str = 1,
          autoscaling_config: dict[str, Any] | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
          max_ongoing_requests: int | None = None) -> Any:
    """A Ray Serve application of ``LinFusionDeployment`` (pass it to ``serve.run``).

    ``num_replicas`` (or ``"auto"``) and ``autoscaling_config`` (Ray's dict: min_replicas, max_replicas,
    target_ongoing_requests, ...) scale it; ``num_cpus``/``num_gpus`` are reserved per replica.
    ``max_ongoing_requests`` (default: the replica's queue plus one batch) must exceed --max-batch
    for the replica's dynamic batching to see concurrent requests.
    """
    settings = settings if isinstance(settings, dict) else {f.name: getattr(settings, f.name)
                                                            for f in fields(ServeConfig)}
    config = config_from(settings)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": max_ongoing_requests or config.max_queue + config.max_batch,
        "graceful_shutdown_timeout_s": config.drain_timeout,
        "health_check_period_s": 10,
    }
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas
    return LinFusionDeployment.options(**options).bind(settings)


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run linfusion.serve.ray:app_builder directory=DIR [num_replicas=N] [num_gpus=G] ...``.

    ``min_replicas``/``max_replicas`` turn on autoscaling (with ``target_ongoing_requests``, default
    --max-batch); every other key is a linfusion-serve setting (max_batch, api_key_file, ...).
    """
    args = dict(args)
    scale = {k: args.pop(k) for k in ("num_replicas", "num_cpus", "num_gpus", "max_ongoing_requests") if k in args}
    auto = {k: int(args.pop(k)) for k in ("min_replicas", "max_replicas") if k in args}
    target = args.pop("target_ongoing_requests", None)
    autoscaling = None
    if auto:
        autoscaling = {**auto, "target_ongoing_requests": float(target or args.get("max_batch", 4))}
    replicas = scale.get("num_replicas", 1)
    return build(args, num_replicas=replicas if replicas == "auto" else int(replicas), autoscaling_config=autoscaling,
                 num_cpus=float(scale.get("num_cpus", 1)), num_gpus=float(scale.get("num_gpus", 0)),
                 max_ongoing_requests=int(scale["max_ongoing_requests"]) if "max_ongoing_requests" in scale else None)
