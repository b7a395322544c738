"""The service's settings and the ``linfusion-serve`` command line that fills them."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
API_KEY_ENV = "LINFUSION_API_KEY"


class ConfigError(ValueError):
    """A setting the service cannot start with; the message names the remedy."""


@dataclass
class ServeConfig:
    directory: str
    host: str = LOOPBACK
    port: int = 8000
    backend: str = "auto"
    max_batch: int = 4
    """Images per UNet batch that requests are coalesced into."""
    batch_wait_ms: float = 10.0
    """How long the first request of a batch waits for compatible ones."""
    max_queue: int = 64
    """Images waiting (not yet running) beyond which new requests get 503."""
    request_timeout: float = 300.0
    max_pixels: int = 2048 * 2048
    max_steps: int = 150
    max_images: int = 8
    max_body_mb: float = 32.0
    api_key: str | None = None
    drain_timeout: float = 60.0
    threads: int = 0
    verify: bool = True
    cache_dir: str | None = None
    """ONNX Runtime's optimised-model cache (``runtime.model_cache``): a directory, "off", or None for
    ``$LINFUSION_CACHE`` / ``~/.cache/linfusion/ort``."""
    model_name: str | None = None
    """The name clients see (/v1/models, sd-models); default: the export directory's name."""
    log_level: str = "info"

    @property
    def name(self) -> str:
        return self.model_name or Path(self.directory).resolve().name

    @property
    def cache(self) -> str | bool | None:
        """``cache_dir`` as ``Pipeline.from_export`` takes it."""
        return False if (self.cache_dir or "").strip().lower() == "off" else self.cache_dir

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    def check(self) -> ServeConfig:
        positive = {"--port": self.port, "--max-batch": self.max_batch, "--max-queue": self.max_queue,
                    "--request-timeout": self.request_timeout, "--max-pixels": self.max_pixels,
                    "--max-steps": self.max_steps, "--max-images": self.max_images,
                    "--max-body-mb": self.max_body_mb}
        for option, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{option} must be positive, got {value}")
        if self.batch_wait_ms < 0 or self.drain_timeout < 0:
            raise ConfigError("--batch-wait-ms and --drain-timeout must not be negative")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("the API key is empty; put a non-empty key in --api-key-file or LINFUSION_API_KEY")
        from linfusion.runtime.backends.onnxruntime import arena_environment

        try:
            arena_environment()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return self


def parser() -> argparse.ArgumentParser:
    d = ServeConfig("")
    p = argparse.ArgumentParser(
        prog="linfusion-serve",
        description="Serve a LinFusion export over HTTP (OpenAI images API, AUTOMATIC1111 API, Prometheus "
                    "metrics) with dynamic batching, without PyTorch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("directory", help="export directory written by linfusion-export")
    p.add_argument("--host", default=None,
                   help=f"address to bind; without it the server binds {LOOPBACK} (give 0.0.0.0 to expose it, "
                        f"preferably with an API key)")
    p.add_argument("--port", type=int, default=d.port, help="TCP port")
    p.add_argument("--backend", default=d.backend, choices=["auto", "onnxruntime", "tensorrt"],
                   help="runtime backend (auto: TensorRT engines when present, else ONNX Runtime)")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help="images per batch that compatible requests (same size, steps, scheduler, guidance, "
                        "mode) are coalesced into; 1 disables batching")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="how long a batch waits for compatible requests before it starts")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="queued images beyond which requests are refused with 503 and Retry-After")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="seconds after which a request is answered 504 and its queued work dropped")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="largest width x height accepted")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="most denoising steps accepted")
    p.add_argument("--max-images", type=int, default=d.max_images, help="most images per request")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_mb,
                   help="largest request body in MiB (larger: 413)")
    p.add_argument("--api-key-file", default=None,
                   help=f"file holding the bearer token clients must send (default: ${API_KEY_ENV} if set, "
                        f"else no authentication)")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                   help="on SIGTERM, seconds to finish running and queued work before exiting")
    p.add_argument("--threads", type=int, default=d.threads, help="ONNX Runtime intra-op threads (0: default)")
    p.add_argument("--model-name", default=None, help="model name clients see (default: the directory's name)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the export files")
    p.add_argument("--cache-dir", default=None,
                   help="ONNX Runtime optimised-model cache: a directory or 'off' (default: $LINFUSION_CACHE, "
                        "else ~/.cache/linfusion/ort)")
    p.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"])
    return p


def from_args(argv: list[str] | None = None) -> ServeConfig:
    args = parser().parse_args(argv)
    key = None
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --api-key-file {args.api_key_file}: {exc.strerror}") from exc
    elif os.environ.get(API_KEY_ENV) is not None:
        key = os.environ[API_KEY_ENV].strip()
    return ServeConfig(
        directory=args.directory, host=args.host or LOOPBACK, port=args.port, backend=args.backend,
        max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
        request_timeout=args.request_timeout, max_pixels=args.max_pixels, max_steps=args.max_steps,
        max_images=args.max_images, max_body_mb=args.max_body_mb, api_key=key, drain_timeout=args.drain_timeout,
        threads=args.threads, verify=not args.no_verify, cache_dir=args.cache_dir, model_name=args.model_name, log_level=args.log_level,
    ).check()
