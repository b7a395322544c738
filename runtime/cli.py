"""``linfusion-generate``: images from an export directory, with ONNX Runtime or TensorRT."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import hires
from .cli_checks import (
    GPU_EXTRAS,
    CliError,
    HelpFormatter,
    check_output_file,
    exit_status_epilog,
    fail,
    image_suffixes,
    numbered_paths,
    require_extra,
    require_extras,
)

PROG = "linfusion-generate"
SCHEDULER_NAMES = ("euler", "euler_a", "ddim", "pndm", "dpmpp_2m", "dpmpp_2m_karras", "lcm")
"""For --help; --scheduler is checked against the runtime's registry before the models load."""
RUNTIME_MODULES = ("numpy", "onnxruntime", "tokenizers", "PIL")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=HelpFormatter,
        description="Generate images from a LinFusion export directory (no PyTorch).",
        epilog=exit_status_epilog("0 images written",
                                  "2 bad arguments, output path or export, a missing extra, or the "
                                  "generation failed;\n    one line on stderr"))
    p.add_argument("directory", help="export directory written by linfusion-export")
    p.add_argument("--prompt", required=True, help="what the image shows")
    p.add_argument("--negative-prompt", help="what to steer away from (default: none, the empty prompt)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale; 1 or less turns guidance off "
                        "(default: 7.5, SD-XL 5.0)")
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="rescales the guided prediction against over-exposure, 0 to 1 (0: off)")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of the export's pixel "
                                              "multiple (default: the model's native size)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's native size)")
    p.add_argument("--seed", type=int,
                   help="same seed, same image (default: random; printed before the models load)")
    p.add_argument("--scheduler", metavar="NAME",
                   help=f"{', '.join(SCHEDULER_NAMES)} (default: the one the export's scheduler_config.json "
                        "names, euler where the runtime lacks it; the summary line says which ran)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"],
                   help="auto: TensorRT engines when built and importable here, else ONNX Runtime")
    p.add_argument("--init-image", help="image for img2img (SDEdit) (default: none, text to image)")
    p.add_argument("--mask-image",
                   help="inpainting: white where --init-image is regenerated (resized like diffusers; a mask of "
                        "other proportions is refused) (default: none)")
    p.add_argument("--strength", type=float,
                   help="img2img: share of the schedule re-noised, in (0, 1] "
                        "(default: 0.8 with --init-image, 1 with --mask-image)")
    p.add_argument("--control-image", action="append", metavar="PATH",
                   help="ControlNet exports: the control image (edges, depth, pose ...), resized to the request's "
                        "size like diffusers; repeat once per ControlNet (default: none, plain text to image)")
    p.add_argument("--control-scale", type=float, action="append", metavar="SCALE",
                   help="ControlNet conditioning scale; one value, or one per ControlNet (default: 1.0)")
    p.add_argument("--control-start", type=float, action="append", metavar="FRACTION",
                   help="share of the schedule before the ControlNet starts, in [0, 1) (default: 0.0)")
    p.add_argument("--control-end", type=float, action="append", metavar="FRACTION",
                   help="share of the schedule after which the ControlNet stops, in (0, 1] (default: 1.0)")
    p.add_argument("--latents", help=".npy file with the initial noise [B, 4, H/8, W/8] (default: drawn from "
                                     "the seed)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--cfg-mode", default="batched", choices=["batched", "sequential"],
                   help="sequential runs the unconditional and text passes one after the other (less memory)")
    p.add_argument("--tile-vae", default="auto", metavar="auto|on|off|PIXELS",
                   help="tiled VAE encode and decode; auto tiles beyond twice the model's native size per "
                        "side, on sizes tiles from a memory budget, PIXELS is the tile edge (e.g. 1024)")
    hires.add_cli_arguments(p)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its own choice)")
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="add a LoRA (.safetensors, diffusers/PEFT or kohya) to the weights at load time, no "
                        "re-export; repeatable, summed in order (default: none; scale 1.0)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the export files")
    p.add_argument("--memory-limit", metavar="SIZE",
                   help="memory the generation may use in all, e.g. 12G or 800M (default: what is available "
                        "when it starts); a request estimated above it is refused before any model runs")
    p.add_argument("--output", default="out.png",
                   help="output image (.png, .jpg, .jpeg or .webp); with several images, _0, _1 ... are "
                        "inserted before the suffix")
    return p


def progress_bar(step: int, total: int) -> None:
    width = 30
    done = width * step // total
    print(f"\r  denoising [{'#' * done}{'.' * (width - done)}] {step}/{total}",
          end="" if step < total else "\n", file=sys.stderr, flush=True)


def stage_progress(stage: int, step: int, total: int) -> None:
    """The progress bar, restarted for each stage of a hires chain."""
    if step == 1 and stage:
        print(f"  stage {stage}", file=sys.stderr, flush=True)
    progress_bar(step, total)


def tile_option(text: str) -> bool | int | None:
    """--tile-vae: auto -> None, on -> True, off -> False, a number -> a tile edge in pixels."""
    named = {"auto": None, "on": True, "off": False}
    if text.lower() in named:
        return named[text.lower()]
    try:
        pixels = int(text)
    except ValueError:
        raise CliError(f"--tile-vae must be auto, on, off or a tile edge in pixels, got {text!r}") from None
    if pixels < 1:
        raise CliError(f"--tile-vae must be a positive number of pixels, got {pixels}")
    return pixels


def random_seed() -> int:
    """A 32-bit seed from os.urandom, as the pipeline draws one."""
    return int.from_bytes(os.urandom(4), "little")


def preflight(args: argparse.Namespace) -> list[Path]:
    """Everything checked before a model loads; returns the image paths to write."""
    require_extras(RUNTIME_MODULES, "runtime", "the runtime")
    if args.backend == "tensorrt":
        require_extra("tensorrt", GPU_EXTRAS, "--backend tensorrt")
    for option, value in (("--num-images", args.num_images), ("--steps", args.steps)):
        if value < 1:
            raise CliError(f"{option} must be at least 1, got {value}")
    output = check_output_file(args.output, "--output", image_suffixes())
    paths = numbered_paths(output, args.num_images)
    for path in paths:
        if path != output:
            check_output_file(path, "--output")
    if args.memory_limit is not None:
        from .memory import parse_memory

        try:
            args.memory_limit = parse_memory(args.memory_limit)
        except ValueError as exc:
            raise CliError(f"--memory-limit: {exc}") from None
    args.tile_vae = tile_option(args.tile_vae)
    try:
        args.hires = hires.from_cli(args)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.mask_image is not None:
        from .inpaint import check_mask_file

        check_mask_file(args.mask_image, args.init_image)
    if args.lora:
        from .lora_keys import LoraError, check_file, parse_lora_arg

        try:
            args.lora = [parse_lora_arg(text) for text in args.lora]
            for path, _ in args.lora:
                check_file(path)
        except LoraError as exc:
            raise CliError(f"--lora: {exc}") from None
    from .controlnet import check_cli_arguments

    check_cli_arguments(args)
    if args.scheduler is not None:
        from .schedulers import SCHEDULERS

        if args.scheduler not in SCHEDULERS:
            raise CliError(f"unknown scheduler '{args.scheduler}'; choose one of {', '.join(SCHEDULERS)}")
    return paths


def check_size_and_stages(args: argparse.Namespace) -> None:
    """The export's size limit and the hires stages, from its manifest alone (no model loads)."""
    from .limits import check_size
    from .manifest import load_manifest
    from .request import GenerationRequest

    facts = load_manifest(args.directory, verify=False, files=False).pipeline  # the files: at load
    width, height = args.width or facts.default_size, args.height or facts.default_size
    check_size(facts, width, height)
    # The same rule as the pipeline's: the chain or one pass (the latents file is not read yet).
    request = GenerationRequest(args.prompt, image=args.init_image, num_images_per_prompt=args.num_images,
                                latents=args.latents, control_image=getattr(args, "control_image", None),
                                hires=args.hires)
    chain = hires.resolve_hires(request)
    if chain is not None:
        hires.stages(chain, width, height, args.steps, facts.default_size, facts.pixel_multiple)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        paths = preflight(args)
    except CliError as exc:
        return fail(PROG, exc)

    from .manifest import ManifestError
    from .request import GenerationError

    try:
        check_size_and_stages(args)
    except (ManifestError, GenerationError) as exc:
        return fail(PROG, exc)

    import numpy as np

    from .backends.select import BackendError
    from .controlnet import control_kwargs
    from .lora_keys import LoraError
    from .pipeline import Pipeline

    latents = None
    if args.latents:
        try:
            latents = np.load(args.latents, allow_pickle=False)
        except (OSError, ValueError) as exc:
            return fail(PROG, f"cannot read latents {args.latents}: {exc}")
    seed = random_seed() if args.seed is None else args.seed
    print(f"seed {seed}", flush=True)
    try:
        start = time.perf_counter()
        pipe = Pipeline.from_export(args.directory, backend=args.backend, verify=not args.no_verify,
                                    intra_op_threads=args.threads, memory_limit=args.memory_limit,
                                    loras=args.lora or None)
        load_time = time.perf_counter() - start
        result = pipe(args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                      num_inference_steps=args.steps, guidance_scale=args.guidance, seed=seed,
                      scheduler=args.scheduler, num_images_per_prompt=args.num_images, latents=latents,
                      image=args.init_image, strength=args.strength, guidance_rescale=args.guidance_rescale,
                      cfg_mode=args.cfg_mode, tile_vae=args.tile_vae, hires=args.hires, callback=stage_progress,
                      mask_image=args.mask_image, **control_kwargs(args))
    except (ManifestError, GenerationError, BackendError, LoraError) as exc:
        return fail(PROG, exc)
    if len(result.images) != len(paths):
        paths = numbered_paths(Path(args.output).expanduser(), len(result.images))
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for image, path in zip(result.images, paths):
            image.save(path)
    except (OSError, ValueError) as exc:
        return fail(PROG, f"cannot write {args.output}: {exc} (seed {result.seed})")
    scheduler = getattr(result, "scheduler", None) or args.scheduler or _default_scheduler(pipe)
    t = result.timings
    for record in t.get("stages", []) if len(t.get("stages", [])) > 1 else []:
        print(hires.stage_line(record))
    print(f"seed {result.seed}; scheduler {scheduler}; backend {pipe.backend}; load {load_time:.2f}s, "
          f"encode {t['encode']:.2f}s, UNet {t['unet_per_step']:.3f}s/step, denoise {t['denoise']:.2f}s, "
          f"decode {t['decode']:.2f}s, total {t['total']:.2f}s")
    if pipe.loras:
        from .lora import summary

        print("\n".join(summary(record) for record in pipe.loras))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _default_scheduler(pipe) -> str:
    """The name the pipeline picks without --scheduler (for results that do not record it)."""
    from .schedulers import default_scheduler_name

    return default_scheduler_name(getattr(pipe, "scheduler_config", {}) or {})


if __name__ == "__main__":
    sys.exit(main())
