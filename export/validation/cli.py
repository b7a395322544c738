"""``linfusion-validate``: prove that an export (and its engines) compute what PyTorch computes.

Exit status: 0 when every check passed, 1 when a check failed, 2 for a request that cannot be
validated (bad arguments, missing or changed files, a reference file for another export).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from .targets import UnknownTargetError, parse_backends
from .cases import CaseError, parse_sizes
from .validate import CHECKSUM_MODES, Options, ValidationInputError, validate

EXIT_PASSED, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="linfusion-validate",
        description="Compare an export directory's ONNX models (ONNX Runtime) and TensorRT engines with "
                    "the PyTorch pipeline, component by component and end to end.")
    p.add_argument("export_dir", metavar="DIR", help="export directory written by linfusion-export")
    p.add_argument("--reference", metavar="MODEL",
                   help="reference model (preset, folder or hub id); default: the manifest's source model")
    p.add_argument("--linfusion", metavar="PATH", help="LinFusion checkpoint for --reference")
    p.add_argument("--random-weights", action="store_true", default=None,
                   help="build --reference with seeded random weights")
    p.add_argument("--backends", help="comma-separated: onnxruntime,tensorrt (default: both; TensorRT is "
                                      "reported as skipped where it cannot run)")
    p.add_argument("--sizes", help="image sizes WIDTHxHEIGHT, comma-separated (default: the model's native "
                                   "square size and a non-square one)")
    p.add_argument("--batch", type=int, help="batch size of every case (default 2)")
    p.add_argument("--components", help="comma-separated subset of the export's components (default: all)")
    p.add_argument("--end-to-end", action="store_true",
                   help="also generate with the runtime and with diffusers from the same latents; compare images")
    files = p.add_mutually_exclusive_group()
    files.add_argument("--save-reference", metavar="FILE", type=Path,
                       help="write the PyTorch inputs and outputs to FILE.npz + FILE.json (needs torch)")
    files.add_argument("--load-reference", metavar="FILE", type=Path,
                       help="compare against FILE from --save-reference instead of PyTorch (no torch needed)")
    p.add_argument("--report", metavar="FILE", type=Path, help="write the JSON report here")
    p.add_argument("--checksums", choices=CHECKSUM_MODES, default="verify",
                   help="verify (default: refuse changed files), report (list them and go on) or skip")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--providers", help="ONNX Runtime execution providers, comma-separated (default: the best)")
    p.add_argument("--quiet", action="store_true", help="print only the table and the summary")
    p.add_argument("--verbose", action="store_true", help="show library warnings")
    return p


def options_from(args: argparse.Namespace) -> Options:
    """Cheap argument checks, before any model is loaded."""
    if not Path(args.export_dir).is_dir():
        raise ValidationInputError(f"export directory not found: {args.export_dir}")
    if args.batch is not None and args.batch < 1:
        raise ValidationInputError(f"--batch must be at least 1, got {args.batch}")
    if args.load_reference is not None and args.reference is not None:
        raise ValidationInputError("--reference and --load-reference exclude each other: the file is the reference")
    split = (lambda text: [s.strip() for s in text.split(",") if s.strip()])
    return Options(
        export_dir=Path(args.export_dir), backends=parse_backends(args.backends) if args.backends else None,
        sizes=parse_sizes(args.sizes) if args.sizes else None, batch=args.batch,
        components=split(args.components) if args.components else None, reference_model=args.reference,
        linfusion=args.linfusion, random_weights=args.random_weights, end_to_end=args.end_to_end,
        save_reference=args.save_reference, load_reference=args.load_reference, checksums=args.checksums,
        providers=split(args.providers) if args.providers else None, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.verbose:
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
    progress = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        report = validate(options_from(args), progress)
    except (ValidationInputError, CaseError, UnknownTargetError) as exc:
        print(f"linfusion-validate: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("linfusion-validate: interrupted", file=sys.stderr)
        return EXIT_BAD_INPUT
    if report.checks or report.end_to_end:
        print(report.table())
    if args.report is not None:
        report.write(args.report)
    print(report.summary())
    return EXIT_PASSED if report.passed else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
