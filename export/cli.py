"""``linfusion-export``: turn a LinFusion pipeline into an export directory."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings

from linfusion.runtime.cli_checks import (
    CliError,
    HelpFormatter,
    check_output_dir,
    exit_status_epilog,
    fail,
    require_extras,
)

PROG = "linfusion-export"
EXPORT_MODULES = ("torch", "diffusers", "transformers", "onnx", "onnxscript", "polygraphy")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=HelpFormatter,
        description="Export a LinFusion pipeline to ONNX (dynamic batch, height and width).",
        epilog=exit_status_epilog("0 export directory written",
                                  "2 bad arguments or output path, a missing extra, a model that cannot be "
                                  "loaded,\n    or a failed export or parity check; one line on stderr"))
    p.add_argument("--model", required=True,
                   help="preset (sd15, sd21, sdxl, tiny-sd, tiny-sdxl), local diffusers folder, or hub id")
    p.add_argument("--linfusion", help="LinFusion checkpoint: local folder or hub id "
                                       "(default: the official one for the base model)")
    p.add_argument("--random-weights", action="store_true",
                   help="build the preset's real architecture offline with seeded random weights")
    p.add_argument("--vae", help="replacement VAE (folder or hub id), e.g. a fixed fp16 SD-XL VAE; "
                                 "one without force_upcast is exported in fp16 (default: the model's own)")
    p.add_argument("--controlnet", action="append", metavar="MODEL",
                   help="ControlNet to export beside the UNet (local diffusers folder or hub id; repeat for "
                        "several; 'random': seeded random weights from the UNet, for tests and offline use; default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-weights")
    p.add_argument("--revision", help="hub revision of the base model (default: the latest)")
    p.add_argument("--output", required=True, help="export directory to create")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="weights and activations of the exported models")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset of the exported models")
    p.add_argument("--components", help="comma-separated subset, e.g. unet,vae_decoder (default: all)")
    p.add_argument("--max-size", default="16384x8192", metavar="WxH",
                   help="largest image the UNet must run at batch 1 with no tensor above --tensor-limit; "
                        "feed-forwards and cross-attentions are token-chunked for it (default 16384x8192)")
    p.add_argument("--tensor-limit", type=int, default=2**31 - 1, metavar="N",
                   help="most elements any UNet tensor may have up to --max-size (default 2147483647 = "
                        "2^31 - 1, TensorRT's limit)")
    p.add_argument("--skip-parity", action="store_true",
                   help="skip the PyTorch parity check (huge models on small machines); recorded as skipped")
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="fuse a LoRA (.safetensors, diffusers/PEFT or kohya) into the weights through diffusers' "
                        "load_lora_weights + fuse_lora; repeatable, applied in order (default: none; scale 1.0)")
    p.add_argument("--offline", action="store_true", help="use only the local hub cache")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--verbose", action="store_true", help="show library warnings and exporter logs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_output_dir(args.output, "--output", force=args.force)
        require_extras(EXPORT_MODULES, "export", "exporting")
    except CliError as exc:
        return fail(PROG, exc)
    if not args.verbose:
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
    from linfusion.hub import ModelSourceError
    from linfusion.mount import CheckpointMismatchError

    from .chunking import TensorLimitError, parse_size
    from .controlnet import ControlNetSourceError, attach_controlnets
    from .exporter import PRECISIONS, ExportError, available_components, export_pipeline
    from .onnx_file import SUPPORTED_OPSETS, ExportCheckError

    # Cheap argument checks first, before any model is loaded.
    if args.opset not in SUPPORTED_OPSETS:
        return fail(PROG, f"unsupported opset {args.opset}; choose "
                          f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}")
    try:
        max_size = parse_size(args.max_size)
    except TensorLimitError as exc:
        return fail(PROG, f"--max-size: {exc}")
    if args.tensor_limit < 1:
        return fail(PROG, f"--tensor-limit must be a positive number of elements, got {args.tensor_limit}")
    components = [c.strip() for c in args.components.split(",")] if args.components else None
    if components:
        known = available_components(True, len(args.controlnet or ()))
        unknown = sorted(set(components) - set(known))
        if unknown:
            return fail(PROG, f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(known)}")

    from linfusion.runtime.lora_keys import LoraError, check_file, parse_lora_arg

    try:  # the files themselves (pickles, damaged files, key formats, alphas, ranks) before the model loads
        loras = [parse_lora_arg(text) for text in args.lora or ()]
        for path, _ in loras:
            check_file(path)
    except LoraError as exc:
        return fail(PROG, exc)

    from linfusion.runtime.signals import Terminated, terminations_interrupt

    from linfusion.loader import load_pipeline

    start = time.perf_counter()
    try:
        with terminations_interrupt():  # SIGTERM / SIGHUP clean up like Ctrl-C
            print(f"loading {args.model} ...", flush=True)
            loaded = load_pipeline(args.model, linfusion=args.linfusion, random_weights=args.random_weights,
                                   dtype=PRECISIONS[args.precision], seed=args.seed, revision=args.revision,
                                   local_files_only=args.offline, vae=args.vae)
            if args.controlnet:
                attach_controlnets(loaded, args.controlnet, args.seed, args.offline)
            print(f"loaded in {time.perf_counter() - start:.1f}s; exporting to {args.output} "
                  f"({args.precision}, opset {args.opset})", flush=True)
            export_pipeline(loaded, args.output, args.precision, args.opset, components, args.force,
                            args.skip_parity, progress=lambda line: print(line, flush=True),
                            max_size=max_size, tensor_limit=args.tensor_limit, loras=loras)
    except ModelSourceError as exc:  # the API words the remedy for Python callers; say it in flags here
        hint = getattr(exc, "cli_hint", None)
        return fail(PROG, f"{getattr(exc, 'problem', exc)}; {hint}" if hint else exc)
    except (CheckpointMismatchError, ControlNetSourceError, ExportError, ExportCheckError, LoraError,
            OSError) as exc:
        return fail(PROG, exc)
    except Terminated as exc:
        fail(PROG, f"{exc}; nothing was written")
        return exc.exit_code
    except KeyboardInterrupt:
        return fail(PROG, "interrupted; nothing was written")
    print(f"done in {time.perf_counter() - start:.1f}s: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
