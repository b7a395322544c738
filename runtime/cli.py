"""``linfusion-generate``: images from an export directory, with ONNX Runtime or TensorRT."""

from __future__ import annotations

import argparse
import sys
import time


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="linfusion-generate",
                                description="Generate images from a LinFusion export directory (no PyTorch).")
    p.add_argument("directory", help="export directory written by linfusion-export")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, help="guidance scale (default 7.5, SD-XL 5.0)")
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--seed", type=int, help="same seed, same image (default: random, printed)")
    p.add_argument("--scheduler", help="euler, euler_a, ddim, dpmpp_2m, dpmpp_2m_karras or lcm "
                                       "(default: the exported scheduler's)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
    p.add_argument("--init-image", help="image for img2img (SDEdit)")
    p.add_argument("--strength", type=float, help="img2img strength in (0, 1] (default 0.8)")
    p.add_argument("--latents", help=".npy file with the initial noise [B, 4, H/8, W/8]")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--cfg-mode", default="batched", choices=["batched", "sequential"],
                   help="sequential runs the unconditional and text passes one after the other (less memory)")
    p.add_argument("--tile-vae", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: default)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the export files")
    p.add_argument("--output", default="out.png",
                   help="output image; with several images, _0, _1 ... are inserted before the suffix")
    return p


def progress_bar(step: int, total: int) -> None:
    width = 30
    done = width * step // total
    print(f"\r  denoising [{'#' * done}{'.' * (width - done)}] {step}/{total}", end="" if step < total else "\n",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pathlib import Path

    import numpy as np

    from .backends.select import BackendError
    from .manifest import ManifestError
    from .pipeline import GenerationError, Pipeline

    latents = None
    if args.latents:
        try:
            latents = np.load(args.latents, allow_pickle=False)
        except (OSError, ValueError) as exc:
            return fail(f"cannot read latents {args.latents}: {exc}")
    try:
        start = time.perf_counter()
        pipe = Pipeline.from_export(args.directory, backend=args.backend, verify=not args.no_verify,
                                    intra_op_threads=args.threads)
        load_time = time.perf_counter() - start
        tile = {"auto": None, "on": True, "off": False}[args.tile_vae]
        result = pipe(args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                      num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                      scheduler=args.scheduler, num_images_per_prompt=args.num_images, latents=latents,
                      image=args.init_image, strength=args.strength, guidance_rescale=args.guidance_rescale,
                      cfg_mode=args.cfg_mode, tile_vae=tile, callback=progress_bar)
    except (ManifestError, GenerationError, BackendError) as exc:
        return fail(str(exc))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = [output] if len(result.images) == 1 else [
        output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(len(result.images))]
    for image, path in zip(result.images, paths):
        image.save(path)
    t = result.timings
    print(f"seed {result.seed}; backend {pipe.backend}; load {load_time:.2f}s, encode {t['encode']:.2f}s, "
          f"UNet {t['unet_per_step']:.3f}s/step, denoise {t['denoise']:.2f}s, decode {t['decode']:.2f}s, "
          f"total {t['total']:.2f}s")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def fail(message: str) -> int:
    print(f"linfusion-generate: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
