"""Prometheus metrics of one service (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class Metrics:
    def __init__(self, queue_depth: Callable[[], float] | None = None) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("linfusion_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("linfusion_request_latency_seconds", "Time from request to response",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("linfusion_queue_depth", "Images waiting in the queue (not yet running)",
                                 registry=r)
        if queue_depth is not None:
            self.queue_depth.set_function(queue_depth)
        self.queue_wait = Histogram("linfusion_queue_wait_seconds", "Time an image waited before its batch started",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("linfusion_batch_size", "Images per batch run by the model",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.unet_step = Histogram("linfusion_unet_seconds_per_step", "UNet seconds per denoising step of a batch",
                                   buckets=STEP_BUCKETS, registry=r)
        self.ready = Gauge("linfusion_ready", "1 once every model is loaded and the server is not draining",
                           registry=r)
        self.images = Counter("linfusion_images", "Images generated and answered", registry=r)
        self.steps = Counter("linfusion_denoise_steps", "Denoising steps run (one per batch and step)", registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
