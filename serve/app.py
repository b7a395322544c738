"""The FastAPI application: routes of both API styles, probes, metrics, auth, limits and request logs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from linfusion.runtime.request import GenerationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from . import api
from .batcher import Draining, JobExpired, QueueFull
from .config import ServeConfig
from .gate import Gate
from .service import ClientGone, NotReady, Service


def error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    line = " ".join(str(message).split())  # always one line
    return JSONResponse({"error": {"message": line, "type": kind}}, status_code=status, headers=headers)


def create_app(config: ServeConfig, service: Service | None = None) -> FastAPI:
    """The app for one export; ``service`` may be given (tests, Ray), else it is made from ``config``."""
    service = service or Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        await asyncio.to_thread(service.close)

    app = FastAPI(title="linfusion-serve", version="1", lifespan=lifespan,
                  description="LinFusion text-to-image and image-to-image over HTTP, without PyTorch.")
    app.state.service = service
    app.add_middleware(Gate, service=service)
    install_error_handlers(app, service)

    # probes and metadata -----------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        if service.draining:
            return error(503, "the server is draining (shutting down)", "service_unavailable")
        if service.pipe is None:
            message = (f"the model failed to load: {service.load_error}" if service.load_error
                       else "the model is loading")
            return error(503, message, "service_unavailable", {"Retry-After": "2"})
        return JSONResponse({"status": "ready", "model": config.name, "backend": service.pipe.backend,
                             "load_seconds": service.load_seconds, "instance": service.instance})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.name, "object": "model", "created": created(config),
                                            "owned_by": "linfusion"}]}

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        digest = model_digest(service)
        return [{"title": f"{config.name} [{digest[:10]}]" if digest else config.name, "model_name": config.name,
                 "hash": digest[:10] or None, "sha256": digest or None, "filename": str(config.directory),
                 "config": None}]

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return api.available_samplers()

    @app.get("/sdapi/v1/progress")
    async def progress() -> dict[str, Any]:
        return service.progress()

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict[str, Any]:
        service.batcher.interrupt()
        return {}

    # generation --------------------------------------------------------------------------------
    @app.post("/v1/images/generations", openapi_extra=schema(api.OpenAIImageRequest))
    async def images_generations(request: Request) -> dict[str, Any]:
        body = await parse(request, api.OpenAIImageRequest)
        requests = api.openai_requests(body, config)
        results = await run(request, requests)
        pngs = await asyncio.to_thread(lambda: [api.encode_png(r.output.images[0]) for r in results])
        return {"created": int(time.time()),
                "data": [{"b64_json": png, "seed": r.output.seed} for png, r in zip(pngs, results)]}

    @app.post("/sdapi/v1/txt2img", openapi_extra=schema(api.Txt2ImgRequest))
    async def txt2img(request: Request) -> dict[str, Any]:
        body = await parse(request, api.Txt2ImgRequest)
        return await a1111(request, body, api.a1111_requests(body, config))

    @app.post("/sdapi/v1/img2img", openapi_extra=schema(api.Img2ImgRequest))
    async def img2img(request: Request) -> dict[str, Any]:
        body = await parse(request, api.Img2ImgRequest)
        images = await asyncio.to_thread(lambda: [api.decode_image(i, config.max_pixels) for i in body.init_images])
        return await a1111(request, body, api.a1111_requests(body, config, images))

    async def run(request: Request, requests: list[Any]) -> list[Any]:
        first = requests[0]
        info = request.state.info = {"images": len(requests), "steps": first.num_inference_steps,
                                     "size": f"{first.width or 'auto'}x{first.height or 'auto'}"}
        jobs = await service.submit(requests, client_timeout(request))
        results = await service.wait(jobs, request.is_disconnected)
        image = results[0].output.images[0]
        info.update(size=f"{image.width}x{image.height}", batch=max(r.batch for r in results),
                    queue_wait=max(r.queue_wait for r in results))
        return results

    async def a1111(request: Request, body: api.Txt2ImgRequest, requests: list[Any]) -> dict[str, Any]:
        results = await run(request, requests)
        pngs = await asyncio.to_thread(lambda: [api.encode_png(r.output.images[0]) for r in results])
        first = results[0].output
        seeds = [r.output.seed for r in results]
        parameters = body.model_dump(exclude={"init_images", "mask"})
        info = {"prompt": body.prompt, "negative_prompt": body.negative_prompt or "", "seed": seeds[0],
                "all_seeds": seeds, "all_prompts": [body.prompt] * len(seeds), "steps": body.steps,
                "cfg_scale": body.cfg_scale, "sampler_name": api.sampler_name(first.scheduler),
                "width": first.images[0].width, "height": first.images[0].height, "batch_size": body.batch_size,
                "n_iter": body.n_iter, "sd_model_name": config.name,
                "denoising_strength": body.denoising_strength if isinstance(body, api.Img2ImgRequest) else None,
                "interrupted": any(r.interrupted for r in results)}
        return {"images": pngs, "parameters": parameters, "info": json.dumps(info)}

    return app


def install_error_handlers(app: FastAPI, service: Service) -> None:
    """Every error is ``{"error": {"message", "type"}}`` with a one-line message."""
    def busy_headers() -> dict[str, str]:
        return {"Retry-After": str(service.retry_after())}

    def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail
        if exc.status_code == 404:
            message = f"no endpoint {request.method} {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error(exc.status_code, message, "invalid_request_error", getattr(exc, "headers", None))

    handlers = {
        api.ApiError: lambda exc: error(exc.status, exc.message, exc.kind, exc.headers),
        GenerationError: lambda exc: error(400, str(exc), "invalid_request_error"),
        QueueFull: lambda exc: error(503, str(exc), "server_busy", busy_headers()),
        Draining: lambda exc: error(503, str(exc), "service_unavailable", {"Retry-After": "1"}),
        NotReady: lambda exc: error(503, str(exc), "service_unavailable", {"Retry-After": "2"}),
        JobExpired: lambda exc: error(504, str(exc), "timeout"),
        ClientGone: lambda exc: error(499, str(exc), "client_closed_request"),
        RequestValidationError: lambda exc: error(400, validation_message(exc.errors()), "invalid_request_error"),
    }
    for kind, make in handlers.items():
        app.add_exception_handler(kind, lambda request, exc, make=make: make(exc))
    app.add_exception_handler(HTTPException, http_error)


async def parse(request: Request, model: type[BaseModel]) -> Any:
    """The JSON body as ``model`` whatever the Content-Type (curl -d sends form encoding)."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise api.ApiError(400, validation_message(exc.errors())) from None


def schema(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def validation_message(errors: Sequence[Any]) -> str:
    if not errors:
        return "invalid request body"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid value')}{more}"


def client_timeout(request: Request) -> float | None:
    """``X-Request-Timeout: S``: a client may shorten its deadline below --request-timeout."""
    value = request.headers.get("x-request-timeout")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise api.ApiError(400, f"X-Request-Timeout must be a positive number of seconds, got {value!r}")
    return seconds


def created(config: ServeConfig) -> int:
    from pathlib import Path

    try:
        return int(Path(config.directory, "linfusion.json").stat().st_mtime)
    except OSError:
        return 0


def model_digest(service: Service) -> str:
    if service.pipe is None:
        return ""
    from linfusion.runtime.manifest import DIGEST_KEY

    try:
        return str(service.pipe.manifest.to_dict()[DIGEST_KEY])
    except (KeyError, TypeError, ValueError):
        return ""
