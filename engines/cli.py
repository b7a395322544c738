"""``linfusion-build DIR``: TensorRT engines for every component of an export directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from linfusion.runtime.cli_checks import (
    GPU_EXTRAS,
    CliError,
    HelpFormatter,
    check_output_dir,
    check_output_file,
    exit_status_epilog,
    fail,
    install_hint,
    require_extra,
)
from linfusion.runtime.manifest import ManifestError, load_manifest

from .kernel_build import KERNEL_CHOICES
from .profiles import (
    ProfileError,
    check_limits,
    largest_square_side,
    parse_batch,
    parse_sizes,
    spatial_profiles,
)

DEFAULT_MAX_SIDE = 2048

PROG = "linfusion-build"
DESCRIPTION = """\
Build one TensorRT engine per component of an export directory, with optimization profiles
for the given image sizes and batch range, and the linear attention as fused TensorRT plugins.
Writes OUTPUT/<component>.plan and OUTPUT/engines.json; engines already in OUTPUT that this
TensorRT and GPU can load are kept when only some components are rebuilt."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, formatter_class=HelpFormatter,
        epilog=exit_status_epilog("0 engines written",
                                  "2 bad arguments, export or output path, TensorRT or an extra missing, "
                                  "or a failed build;\n    one line on stderr"))
    p.add_argument("export_dir", type=Path, help="an export directory made by linfusion-export")
    p.add_argument("--output", type=Path, help="engines directory (default: EXPORT_DIR/engines)")
    p.add_argument("--min-size", type=int, default=512, help="smallest image side in pixels (default 512)")
    p.add_argument("--opt-size", type=int, default=1024, help="image side to tune for (default 1024)")
    p.add_argument("--max-size", type=int, help="largest image side in pixels, up to the largest square within "
                   "the export's --max-size (default 2048, or that square's side where smaller)")
    p.add_argument("--sizes", help="exact sizes instead of a range: WxH,WxH,... (one static profile each; "
                                   "default: the --min/--opt/--max-size range)")
    p.add_argument("--batch", default="1:1:4", help="images per prompt MIN:OPT:MAX (default 1:1:4); the "
                   "UNet range is doubled for classifier-free guidance")
    p.add_argument("--plugin", choices=("auto", "on", "off"), default="auto",
                   help="fused linear-attention plugin (auto: on with TensorRT >= 10.10)")
    p.add_argument("--attention-kernels", choices=KERNEL_CHOICES, default="auto",
                   help="plugin kernel tactics TensorRT may pick (auto: all, timed at build time). "
                        "tensor-core (two tilings) needs sm_80+ and applies to fp16/bf16 with head dims up "
                        "to 192; float32 and larger head dims always use cuda-core")
    p.add_argument("--timing-cache", type=Path, help="timing cache to reuse and update "
                   "(default: OUTPUT/timing-<TensorRT version>-sm<XY>.cache)")
    p.add_argument("--optimization-level", type=int, default=3, choices=range(6), metavar="N",
                   help="builder optimization level 0-5")
    p.add_argument("--refittable", action="store_true", help="build refittable engines (LoRA swaps)")
    p.add_argument("--components", help="comma-separated subset, e.g. unet,vae_decoder (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    output = args.output or args.export_dir / "engines"
    components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    try:
        check_output_dir(output, "--output", reuse=True)
        if args.timing_cache is not None:
            check_output_file(args.timing_cache, "--timing-cache")
        require_extra("onnx", GPU_EXTRAS, "building engines")
        from .builder import BuildOptions, TensorRTMissing, build_all, builder_tensorrt, select_components

        manifest = load_manifest(args.export_dir)
        multiple = manifest.pixel_multiple
        sides = (args.min_size, args.opt_size, args.max_size)
        if args.max_size is None:  # the default range, shrunk to fit a small export's max size
            max_side = min(DEFAULT_MAX_SIDE, largest_square_side(manifest) or DEFAULT_MAX_SIDE)
            sides = (min(args.min_size, max_side), min(args.opt_size, max_side), max_side)
        if args.sizes:
            spatial = spatial_profiles(multiple, sizes=parse_sizes(args.sizes))
        else:
            spatial = spatial_profiles(multiple, *sides)
        batch = parse_batch(args.batch)
        check_limits(manifest, spatial, batch)
        select_components(manifest, components)
        try:
            builder_tensorrt()
        except TensorRTMissing as exc:
            raise CliError(f"{exc}; {install_hint(GPU_EXTRAS)}") from None
    except (CliError, ManifestError, ProfileError, ValueError) as exc:
        return fail(PROG, exc)

    options = BuildOptions(spatial=spatial, batch=batch, output=output, plugin=args.plugin,
                           kernels=args.attention_kernels, timing_cache=args.timing_cache,
                           optimization_level=args.optimization_level, refittable=args.refittable,
                           components=components)
    from linfusion.runtime.signals import Terminated, terminations_interrupt

    try:
        with terminations_interrupt():  # SIGTERM / SIGHUP stop the build like Ctrl-C
            build_all(args.export_dir, options, log=lambda line: print(line, flush=True))
    except (RuntimeError, ValueError, OSError) as exc:
        # RuntimeError: TensorRTMissing, BuildError, PluginUnavailable and TensorRT's own errors
        return fail(PROG, exc)
    except Terminated as exc:
        fail(PROG, f"{exc}; engines already renamed into place are complete, the rest were not written")
        return exc.exit_code
    except KeyboardInterrupt:
        return fail(PROG, "interrupted; engines already renamed into place are complete, the rest were not "
                          "written")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
