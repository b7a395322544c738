"""The two API styles' request bodies and their translation into runtime requests, one per image.

Every image of an API request becomes its own ``GenerationRequest`` with its own seed (``seed + i``,
as AUTOMATIC1111 numbers a batch's seeds), so each image can be reproduced alone, and images of
one or many API requests are coalesced by the batcher alike.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from typing import Any

from linfusion.runtime.hires import Hires
from linfusion.runtime.request import MAX_SEED, GenerationError, GenerationRequest
from pydantic import BaseModel, ConfigDict, Field

from .config import ServeConfig

OPENAI_DEFAULT_STEPS = 30
A1111_DEFAULT_STEPS = 20

SAMPLERS: dict[str, tuple[str, list[str]]] = {
    # AUTOMATIC1111 name: (runtime scheduler, aliases)
    "Euler": ("euler", ["k_euler"]),
    "Euler a": ("euler_a", ["k_euler_a", "k_euler_ancestral"]),
    "DDIM": ("ddim", []),
    "DPM++ 2M": ("dpmpp_2m", ["k_dpmpp_2m"]),
    "DPM++ 2M Karras": ("dpmpp_2m_karras", ["k_dpmpp_2m_ka"]),
    "LCM": ("lcm", []),
    "PNDM": ("pndm", []),
    "PLMS": ("pndm", []),
}


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type"}}`` with ``status``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


def runtime_schedulers() -> dict[str, Any]:
    from linfusion.runtime.schedulers import SCHEDULERS

    return SCHEDULERS


def available_samplers() -> list[dict[str, Any]]:
    """GET /sdapi/v1/samplers: the A1111 names whose scheduler this runtime has."""
    have = runtime_schedulers()
    return [{"name": name, "aliases": [runtime, *aliases], "options": {}}
            for name, (runtime, aliases) in SAMPLERS.items() if runtime in have]


def scheduler_for(name: str | None, karras: bool = False) -> str | None:
    """An A1111 sampler name, alias or runtime scheduler name -> the runtime's name (None: the export's)."""
    if name is None or name == "":
        return None
    have = runtime_schedulers()
    wanted = name.strip().lower()
    for a1111, (runtime, aliases) in SAMPLERS.items():
        if wanted in (a1111.lower(), runtime, *aliases):
            if runtime not in have:
                break
            if karras and runtime == "dpmpp_2m":
                return "dpmpp_2m_karras"
            return runtime
    else:
        if wanted in have:
            return wanted
    names = ", ".join(s["name"] for s in available_samplers())
    raise ApiError(400, f"unknown or unavailable sampler {name!r}; choose one of {names}")


def sampler_name(runtime: str) -> str:
    return next((a1111 for a1111, (r, _) in SAMPLERS.items() if r == runtime), runtime)


class OpenAIImageRequest(BaseModel):
    """POST /v1/images/generations (OpenAI's fields plus the runtime's as extensions)."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    n: int = 1
    size: str | None = None
    response_format: str = "b64_json"
    model: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int = OPENAI_DEFAULT_STEPS
    guidance_scale: float | None = None
    seed: int | None = None
    scheduler: str | None = None
    hires: str | None = None
    """The staged chain (``runtime.hires``): "auto" or "off" (default: one pass at ``size``)."""
    hires_base: str | None = None
    hires_strengths: list[float] | None = None
    hires_steps: int | None = None
    enable_hr: bool = False
    """AUTOMATIC1111's switch, accepted here as ``hires: "auto"``."""


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img (the AUTOMATIC1111 subset most clients send; other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = ""
    negative_prompt: str | None = None
    steps: int = A1111_DEFAULT_STEPS
    cfg_scale: float = 7.0
    width: int | None = None
    height: int | None = None
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    enable_hr: bool = False
    hr_scale: float | None = None
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_second_pass_steps: int | None = None
    denoising_strength: float | None = None


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: ``init_images`` (base64) and ``denoising_strength`` besides txt2img's."""

    init_images: list[str] = Field(min_length=1)
    denoising_strength: float | None = 0.75
    mask: str | None = None


def check_limits(config: ServeConfig, width: int | None, height: int | None, steps: int, images: int) -> None:
    """The service's limits (before queuing); the pipeline's own checks come after."""
    if images < 1 or images > config.max_images:
        raise ApiError(400, f"{images} images requested; this server allows 1 to {config.max_images} per request")
    if steps > config.max_steps:
        raise ApiError(400, f"{steps} steps requested; this server allows at most {config.max_steps}")
    if width is not None and height is not None and width * height > config.max_pixels:
        raise ApiError(400, f"{width}x{height} is {width * height} pixels; this server allows at most "
                            f"{config.max_pixels} (--max-pixels)")


def openai_hires(body: OpenAIImageRequest) -> Hires | None:
    """The extension fields -> a ``Hires`` (None: one pass); any ``hires_*`` field implies "auto"."""
    mode = body.hires or ("auto" if body.enable_hr else None)
    if mode is None and body.hires_base is None and body.hires_strengths is None and body.hires_steps is None:
        return None
    try:
        return Hires.parse(mode, body.hires_base, body.hires_strengths, body.hires_steps)
    except GenerationError as exc:
        raise ApiError(400, str(exc)) from None


def a1111_hires(body: Txt2ImgRequest) -> tuple[Hires | None, int | None, int | None]:
    """AUTOMATIC1111's Hires. fix -> (``Hires``, target width, target height).

    The first pass runs at width x height; ``hr_scale`` (default 2) or ``hr_resize_x/y`` give the
    target, which must be the first pass's size times a power of two (each stage doubles it); every
    stage refines at ``denoising_strength`` (default: the chain's 0.4 -> 0.1) with
    ``hr_second_pass_steps`` scheduled steps (0: ``steps``)."""
    if not body.enable_hr:
        return None, body.width, body.height
    if body.width is None or body.height is None:
        raise ApiError(400, "enable_hr needs width and height (the first pass's size)")
    if body.hr_resize_x > 0 and body.hr_resize_y > 0:
        width, height = body.hr_resize_x, body.hr_resize_y
        ratio = width / body.width
    else:
        ratio = 2.0 if body.hr_scale is None else body.hr_scale
        width, height = round(body.width * ratio), round(body.height * ratio)
    count = max(int(ratio), 1).bit_length() - 1
    if ratio != 2 ** count or count < 1 or (width, height) != (body.width << count, body.height << count):
        raise ApiError(400, f"Hires. fix here doubles the size per stage: hr_scale (or hr_resize_x/y over "
                            f"width/height) must be 2, 4, 8 or 16, got {ratio:g}")
    strengths = None if body.denoising_strength is None else [body.denoising_strength] * count
    try:
        hires = Hires.parse("auto", (body.width, body.height), strengths, body.hr_second_pass_steps or None)
    except GenerationError as exc:
        raise ApiError(400, str(exc)) from None
    return hires, width, height


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def seeds_for(seed: int | None, count: int) -> list[int]:
    first = random_seed() if seed is None or seed < 0 else int(seed)
    if first + count - 1 > MAX_SEED:
        raise ApiError(400, f"seed must be at most {MAX_SEED - count + 1} for {count} images")
    return [first + i for i in range(count)]


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None:
        return None, None
    match = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", size)
    if not match:
        raise ApiError(400, f"size must look like '512x512' (width x height), got {size!r}")
    return int(match.group(1)), int(match.group(2))


def openai_requests(body: OpenAIImageRequest, config: ServeConfig) -> list[GenerationRequest]:
    if body.response_format != "b64_json":
        raise ApiError(400, f"response_format {body.response_format!r} is not supported; use 'b64_json'")
    if body.model not in (None, "", config.name):
        raise ApiError(404, f"model {body.model!r} does not exist here; this server serves {config.name!r} "
                            f"(GET /v1/models)")
    width, height = parse_size(body.size)
    check_limits(config, width, height, max(body.num_inference_steps, body.hires_steps or 0), body.n)
    scheduler = scheduler_for(body.scheduler)
    hires = openai_hires(body)
    return [GenerationRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, height=height, width=width,
                              num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
                              seed=seed, scheduler=scheduler, hires=hires)
            for seed in seeds_for(body.seed, body.n)]


def a1111_requests(body: Txt2ImgRequest, config: ServeConfig, images: list[Any] | None = None
                   ) -> list[GenerationRequest]:
    if body.enable_hr and images is not None:
        raise ApiError(400, "enable_hr (Hires. fix) belongs to txt2img; send img2img without it")
    if getattr(body, "mask", None):
        raise ApiError(400, "inpainting (mask) is not supported; send img2img without a mask")
    count = body.batch_size * body.n_iter
    if body.batch_size < 1 or body.n_iter < 1:
        raise ApiError(400, "batch_size and n_iter must be at least 1")
    hires, width, height = a1111_hires(body)
    check_limits(config, width, height, max(body.steps, body.hr_second_pass_steps or 0), count)
    karras = (body.scheduler or "").strip().lower() == "karras"
    if body.scheduler and body.scheduler.strip().lower() not in ("automatic", "karras"):
        raise ApiError(400, f"scheduler {body.scheduler!r} is not supported; use 'Automatic' or pick a sampler_name")
    scheduler = scheduler_for(body.sampler_name or body.sampler_index, karras)
    requests = []
    for i, seed in enumerate(seeds_for(body.seed, count)):
        extra = ({"hires": hires} if images is None
                 else {"image": images[i % len(images)], "strength": body.denoising_strength})
        requests.append(GenerationRequest(prompt=body.prompt, negative_prompt=body.negative_prompt or None,
                                          height=height, width=width, num_inference_steps=body.steps,
                                          guidance_scale=body.cfg_scale, seed=seed, scheduler=scheduler, **extra))
    return requests


def decode_image(data: str, max_pixels: int) -> Any:
    """A base64 image (optionally a data: URL) -> an RGB PIL image; its size is checked before decoding."""
    from PIL import Image, UnidentifiedImageError

    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=False)
        image = Image.open(io.BytesIO(raw))
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        raise ApiError(400, "init_images must hold base64-encoded PNG or JPEG images") from None
    if image.width * image.height > max_pixels:
        raise ApiError(400, f"init image {image.width}x{image.height} has more than {max_pixels} pixels "
                            f"(--max-pixels); send a smaller image")
    try:
        return image.convert("RGB")
    except OSError:
        raise ApiError(400, "init image is truncated or corrupt; send a complete PNG or JPEG") from None


def encode_png(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
