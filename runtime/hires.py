"""The staged ultra-high-resolution chain (SDEdit upscaling), LinFusion's official 16K recipe.

Stage 0 is text-to-image at a base size; every later stage doubles both sides: the previous
stage's uint8 image is resized with PIL bicubic to the stage size and refined by img2img at that
stage's strength, with the same prompt, guidance and scheduler. One ``TorchCompatibleGenerator``,
seeded once, is consumed by all stages in order, which is what diffusers does when the same
``torch.Generator`` is passed to ``StableDiffusion(XL)Pipeline`` and then, stage after stage, to
``StableDiffusion(XL)Img2ImgPipeline``; so the chain reproduces diffusers' chain.

``Hires`` is the user's choice (CLI strings parse into it); ``stages`` resolves it against a
target size and the model's native size, refusing bad input with one line before any model runs;
``run_chain`` runs the stages on a ``Pipeline``. Torch-free.
"""

from __future__ import annotations

import gc
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .request import GenerationError, GenerationRequest, finite, whole
from .rng import TorchCompatibleGenerator

MODES = ("auto", "off")
FIRST_STRENGTH, LAST_STRENGTH = 0.4, 0.1


@dataclass(frozen=True)
class Hires:
    """How to reach a large target size: in stages (``auto``) or in one pass (``off``)."""

    mode: str = "auto"
    base: tuple[int, int] | None = None
    """(width, height) of the text-to-image stage; None: the ``auto`` rule (or from ``strengths``)."""
    strengths: tuple[float, ...] | None = None
    """img2img strength of each upscale stage; None: linear from 0.4 down to 0.1."""
    steps: int | None = None
    """Denoising steps each upscale stage is scheduled with (it runs int(steps * strength) of
    them); None: the request's num_inference_steps."""

    @classmethod
    def parse(cls, mode: str | None = "auto", base: str | tuple[int, int] | None = None,
              strengths: str | tuple[float, ...] | list[float] | None = None,
              steps: int | str | None = None) -> Hires:
        """A ``Hires`` from CLI-style values: ``base`` "WxH", ``strengths`` "0.4,0.3,0.2,0.1"."""
        mode = (mode or "auto").strip().lower()
        if mode not in MODES:
            raise GenerationError(f"hires must be one of {', '.join(MODES)}, got {mode!r}")
        size = cls.parse_size(base) if isinstance(base, str) else base
        if isinstance(strengths, str):
            strengths = cls.parse_strengths(strengths)
        if steps is not None:
            try:
                steps = whole("hires steps", int(steps) if isinstance(steps, str) else steps, 1)
            except ValueError:
                raise GenerationError(f"hires steps must be a whole number >= 1, got {steps!r}") from None
        return cls(mode, None if size is None else (int(size[0]), int(size[1])),
                   None if strengths is None else tuple(float(s) for s in strengths), steps)

    @staticmethod
    def parse_size(text: str) -> tuple[int, int]:
        """"1024x512" -> (1024, 512)."""
        parts = text.lower().replace("*", "x").split("x")
        try:
            width, height = (int(p) for p in parts)
        except ValueError:
            raise GenerationError(f"hires base must be WIDTHxHEIGHT, e.g. 1024x512; got {text!r}") from None
        if width < 1 or height < 1:
            raise GenerationError(f"hires base must have positive sides, got {text!r}")
        return width, height

    @staticmethod
    def parse_strengths(text: str) -> tuple[float, ...]:
        """"0.4,0.3" -> (0.4, 0.3); an empty string is no stage at all (refused by ``stages``)."""
        items = [p.strip() for p in text.split(",") if p.strip()]
        try:
            return tuple(float(p) for p in items)
        except ValueError:
            raise GenerationError(f"hires strengths must be comma-separated numbers in (0, 1], "
                                  f"e.g. 0.4,0.3,0.2,0.1; got {text!r}") from None


@dataclass(frozen=True)
class Stage:
    index: int
    width: int
    height: int
    strength: float | None
    """None for the text-to-image stage 0."""
    steps: int
    """num_inference_steps of this stage (an img2img stage runs int(steps * strength) of them)."""


def default_strengths(count: int) -> tuple[float, ...]:
    """Linear from 0.4 to 0.1 over ``count`` upscale stages; exactly 0.4/0.3/0.2/0.1 for four.

    Each value is one correctly rounded division, so the four-stage values equal the literals."""
    if count == 1:
        return (FIRST_STRENGTH,)
    span = count - 1
    return tuple((4 * span - 3 * i) / (10 * span) for i in range(count))


def auto_divisor(width: int, height: int, native: int) -> int:
    """The smallest power of two that brings the long side to at most twice the native side."""
    divisor = 1
    while max(width, height) > 2 * native * divisor:
        divisor *= 2
    return divisor


def _doublings(base: int, target: int) -> int | None:
    ratio, rest = divmod(target, base)
    if rest or ratio & (ratio - 1):
        return None
    return ratio.bit_length() - 1


def stages(hires: Hires, width: int, height: int, steps: int, native: int, multiple: int) -> list[Stage]:
    """The stages that make a ``width`` x ``height`` image; a one-line GenerationError for bad input.

    ``native``: the model's native side in pixels; ``multiple``: image sides must be multiples of it.
    """
    if hires.mode not in MODES:
        raise GenerationError(f"hires must be one of {', '.join(MODES)}, got {hires.mode!r}")
    if hires.mode == "off":
        return [Stage(0, width, height, None, steps)]
    target = f"{width}x{height}"
    if hires.base is not None:
        base_w, base_h = (whole("hires base side", side, 1) for side in hires.base)
        if base_w > width or base_h > height:
            raise GenerationError(f"hires base {base_w}x{base_h} is larger than the target {target}; "
                                  f"choose a smaller base")
        count = _doublings(base_w, width)
        if count is None or count != _doublings(base_h, height):
            raise GenerationError(f"the target {target} must be the hires base {base_w}x{base_h} times "
                                  f"the same power of two on both sides (each stage doubles the size)")
        if count == 0:
            raise GenerationError(f"hires base {base_w}x{base_h} equals the target: no upscale stage; "
                                  f"pass a smaller base or --hires off")
    else:
        divisor = (2 ** len(hires.strengths) if hires.strengths is not None
                   else auto_divisor(width, height, native))
        if hires.strengths is not None and not hires.strengths:
            raise GenerationError("hires strengths are empty (zero upscale stages); give one strength per "
                                  "stage, e.g. 0.4,0.3,0.2,0.1, or use --hires off")
        if width % divisor or height % divisor:
            raise GenerationError(f"the target {target} does not halve {divisor.bit_length() - 1} times into a "
                                  f"whole base size; pass --hires-base WxH")
        base_w, base_h, count = width // divisor, height // divisor, divisor.bit_length() - 1
    if base_w % multiple or base_h % multiple:
        raise GenerationError(f"hires base {base_w}x{base_h} must have sides that are multiples of {multiple}; "
                              f"pass --hires-base WxH with such sides, or another target size")
    strengths = hires.strengths if hires.strengths is not None else default_strengths(count)
    if len(strengths) != count:
        raise GenerationError(f"{len(strengths)} hires strengths for {count} upscale stages "
                              f"({base_w}x{base_h} -> {target}); give exactly {count}")
    stage_steps = steps if hires.steps is None else hires.steps
    out = [Stage(0, base_w, base_h, None, steps)]
    for i, strength in enumerate(strengths, start=1):
        strength = finite(f"hires strength {i}", strength, 0.0, 1.0, low_open=True)
        if int(stage_steps * strength) < 1:
            raise GenerationError(f"hires strength {strength:g} with {stage_steps} steps runs no step in stage "
                                  f"{i}; raise the strength or the (hires) steps to at least "
                                  f"{math.ceil(1 / strength)}")
        out.append(Stage(i, base_w << i, base_h << i, strength, stage_steps))
    return out


def resolve_hires(request: GenerationRequest) -> Hires | None:
    """The chain a request asks for, or None for one pass: ``hires`` None or "off", or "auto" left
    at its defaults on a request the chain does not make (an init image, given latents, several
    images or a ControlNet control image: the chain makes one image from text). Explicit stages on such a request are refused
    by ``plan_stages``."""
    value = request.hires
    if value is None:
        return None
    if isinstance(value, str):
        value = Hires.parse(value)
    if not isinstance(value, Hires):
        raise GenerationError(f"hires must be 'auto', 'off' or a Hires, got {type(value).__name__}")
    if value.mode == "off":
        return None
    prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt or [])
    single_text = (request.image is None and request.latents is None and len(prompts) == 1
                   and request.num_images_per_prompt == 1 and request.control_image is None)
    if not single_text and value == Hires(value.mode, steps=value.steps):
        return None
    return value


def stage_callback(callback: Callable[..., Any] | None, stage: int) -> Callable[[int, int], None] | None:
    """The per-step callback the pipeline calls, for one stage.

    A callback with three positional parameters gets ``(stage, step, total)``; one with two keeps the
    pipeline's ``(step, total)``, so existing callbacks work unchanged."""
    if callback is None:
        return None
    if _positional_count(callback) >= 3:
        return lambda step, total: callback(stage, step, total)
    return callback


def _positional_count(function: Callable[..., Any]) -> int:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return 2
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds for p in parameters)


def always_fits(plan: Any) -> bool:
    return True


def plan_stages(pipe: Any, request: GenerationRequest, hires: Hires,
                fits: Callable[[Any], bool] = always_fits) -> tuple[list[Stage], list[Any], int]:
    """Every check of a chain before any model runs: the stages, each stage's plan (with the
    classifier-free guidance mode that fits) and the seed they share."""
    facts = pipe.facts
    height = request.height or facts.default_size
    width = request.width or facts.default_size
    steps = whole("num_inference_steps", request.num_inference_steps, 1)
    chain = stages(hires, whole("width", width, 1), whole("height", height, 1), steps, facts.default_size,
                   facts.pixel_multiple)
    if len(chain) > 1:
        if request.image is not None or request.strength is not None:
            raise GenerationError("the hires chain starts from text; drop the init image and strength, or "
                                  "use --hires off")
        prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt or [])
        if len(prompts) != 1 or request.num_images_per_prompt != 1:
            raise GenerationError("the hires chain makes one image per call; pass one prompt and "
                                  "num_images_per_prompt=1")
    plans, seed = [], request.seed
    for stage in chain:
        # A later stage is checked as text-to-image at its size: the same UNet and decoder shapes
        # as its img2img run, without making a (possibly huge) image here.
        probe = (request if len(chain) == 1
                 else _stage_request(request, stage, seed, stage.index == len(chain) - 1, None))
        plan = pipe.plan(probe)
        seed = plan.seed
        fitting = fits(plan)
        if plan.cfg and plan.cfg_mode == "batched" and not fitting:
            plan = pipe.plan(replace(probe, cfg_mode="sequential", seed=seed))
            fitting = fits(plan)
        if not fitting:
            raise GenerationError(f"stage {stage.index} ({stage.width}x{stage.height}) does not fit in this "
                                  f"machine's memory even with sequential guidance; choose a smaller size")
        plans.append(plan)
    return chain, plans, seed


def _stage_request(request: GenerationRequest, stage: Stage, seed: int | None, last: bool,
                   image: Any) -> GenerationRequest:
    return replace(request, width=stage.width, height=stage.height, num_inference_steps=stage.steps,
                   seed=seed, image=image, strength=stage.strength if image is not None else None,
                   latents=request.latents if stage.index == 0 else None,
                   output_type=request.output_type if last else "pil")


def run_chain(pipe: Any, request: GenerationRequest, hires: Hires,
              callback: Callable[..., Any] | None = None,
              fits: Callable[[Any], bool] = always_fits) -> Any:
    """Generate ``request`` through the stages of ``hires`` on ``pipe`` (a ``Pipeline``).

    Returns the last stage's ``PipelineOutput``; its ``timings`` sum the stages (``unet_per_step``
    is the last stage's) and ``timings["stages"]`` has one dict per stage. ``fits(plan)`` is the
    memory guard: batched guidance falls back to sequential where it says no.
    """
    from PIL import Image

    start = time.perf_counter()
    chain, plans, seed = plan_stages(pipe, request, hires, fits)
    generator = TorchCompatibleGenerator(seed)
    records: list[dict[str, Any]] = []
    image, result = None, None
    for stage, plan in zip(chain, plans):
        if image is not None:
            image = image.resize((stage.width, stage.height), resample=Image.BICUBIC)
        stage_request = (request if len(chain) == 1
                         else _stage_request(request, stage, seed, stage is chain[-1], image))
        stage_request = replace(stage_request, seed=seed, cfg_mode=plan.cfg_mode)
        del result
        result = pipe.generate(stage_request, stage_callback(callback, stage.index), generator=generator)
        image = None if stage is chain[-1] else result.images[0]
        del stage_request
        gc.collect()  # the previous stage's arrays go before the next, larger stage allocates
        records.append({"stage": stage.index, "width": stage.width, "height": stage.height,
                        "strength": stage.strength, "steps": stage.steps, "cfg_mode": plan.cfg_mode,
                        **result.timings})
    totals = {key: sum(r[key] for r in records) for key in ("encode", "denoise", "decode")}
    result.timings = {**totals, "unet_per_step": records[-1]["unet_per_step"],
                      "total": time.perf_counter() - start, "stages": records}
    return result


def add_cli_arguments(parser: Any) -> None:
    """``--hires auto|off``, ``--hires-base WxH``, ``--hires-strengths``, ``--hires-steps`` (argparse)."""
    parser.add_argument("--hires", default="auto", choices=MODES,
                        help="auto: reach sizes beyond twice the native side in x2 img2img stages (SDEdit); "
                             "off: one pass (default: auto)")
    parser.add_argument("--hires-base", help="size of the text-to-image stage, WxH (default: the auto rule)")
    parser.add_argument("--hires-strengths", help="img2img strength per upscale stage, e.g. 0.4,0.3,0.2,0.1 "
                                                  "(default: linear from 0.4 to 0.1)")
    parser.add_argument("--hires-steps", help="denoising steps the upscale stages are scheduled with "
                                              "(default: --steps)")


def from_cli(args: Any) -> Hires:
    """The ``Hires`` of parsed ``add_cli_arguments`` options (GenerationError for bad strings)."""
    return Hires.parse(args.hires, args.hires_base, args.hires_strengths, args.hires_steps)


def stage_line(record: dict[str, Any]) -> str:
    """One line per stage for a CLI, from ``timings["stages"]``."""
    kind = "text-to-image" if record["strength"] is None else f"img2img {record['strength']:g}"
    return (f"stage {record['stage']}: {record['width']}x{record['height']} {kind}, {record['cfg_mode']} CFG; "
            f"encode {record['encode']:.2f}s, UNet {record['unet_per_step']:.3f}s/step, denoise "
            f"{record['denoise']:.2f}s, decode {record['decode']:.2f}s, total {record['total']:.2f}s")
