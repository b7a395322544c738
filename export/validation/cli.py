"""``linfusion-validate``: prove that an export (and its engines) compute what PyTorch computes.

Exit status: 0 when every check passed, 1 when a check failed, 2 for a request that cannot be
validated (bad arguments, missing or changed files, a reference file for another export, an
unwritable output path, a missing extra, no requested backend available here).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import warnings
from pathlib import Path

from linfusion.runtime.cli_checks import (
    GPU_EXTRAS,
    CliError,
    HelpFormatter,
    MissingExtra,
    check_output_file,
    exit_status_epilog,
    fail,
    install_hint,
    require_extras,
)

from . import reference_file
from .targets import BACKENDS, UnknownTargetError, backend_status, parse_backends
from .cases import CaseError, parse_sizes
from .validate import CHECKSUM_MODES, Options, ValidationInputError, validate

EXIT_PASSED, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
PROG = "linfusion-validate"
TORCH_REFERENCE_MODULES = ("torch", "diffusers", "transformers", "polygraphy", "onnx")
"""The PyTorch reference (the ``export`` extra); polygraphy compares, onnx localises."""
FILE_REFERENCE_MODULES = ("polygraphy", "onnx")
"""--load-reference: no torch; the ``gpu`` extras bring these (as does ``export``)."""
REFERENCE_SUFFIXES = ("", ".npz", ".json")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=HelpFormatter,
        description="Compare an export directory's ONNX models (ONNX Runtime) and TensorRT engines with\n"
                    "the PyTorch pipeline (or a reference saved from it), component by component and end to "
                    "end.",
        epilog=exit_status_epilog("0 every check passed", "1 a check failed (the last line summarises it)",
                                  "2 cannot validate: bad arguments, missing or changed files, unusable "
                                  "output path,\n    missing extra, no requested backend available; one "
                                  "line on stderr"))
    p.add_argument("export_dir", metavar="DIR", help="export directory written by linfusion-export")
    p.add_argument("--reference", metavar="MODEL",
                   help="reference model (preset, folder or hub id); default: the manifest's source model")
    p.add_argument("--linfusion", metavar="PATH",
                   help="LinFusion checkpoint for --reference (default: the manifest's, else the official "
                        "one)")
    p.add_argument("--random-weights", action="store_true", default=None,
                   help="build --reference with seeded random weights (default: as the manifest's source "
                        "was built)")
    p.add_argument("--backends", help="comma-separated: onnxruntime,tensorrt (default: both; TensorRT is "
                                      "reported as skipped where it cannot run; exit 2 when none of the "
                                      "listed backends can run here)")
    p.add_argument("--sizes", help="image sizes WIDTHxHEIGHT, comma-separated (default: the model's native "
                                   "square size and a non-square one)")
    p.add_argument("--batch", type=int, help="batch size of every case (default: 2)")
    p.add_argument("--components", help="comma-separated subset of the export's components (default: all)")
    p.add_argument("--end-to-end", action="store_true",
                   help="also generate with the runtime and with diffusers from the same latents; compare "
                        "images")
    files = p.add_mutually_exclusive_group()
    files.add_argument("--save-reference", metavar="FILE", type=Path,
                       help="write the PyTorch inputs and outputs to FILE.npz + FILE.json (needs torch; "
                            "default: not saved)")
    files.add_argument("--load-reference", metavar="FILE", type=Path,
                       help="compare against FILE from --save-reference instead of PyTorch (no torch; "
                            "default: PyTorch is the reference)")
    p.add_argument("--report", metavar="FILE", type=Path, help="write the JSON report here, a .json file "
                                                               "(default: no report file)")
    p.add_argument("--checksums", choices=CHECKSUM_MODES, default="verify",
                   help="verify (refuse changed files), report (list them and go on) or skip")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--providers",
                   help="ONNX Runtime execution providers, comma-separated (default: the best)")
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
        raise ValidationInputError("--reference and --load-reference exclude each other: the file is the "
                                   "reference")
    split = (lambda text: [s.strip() for s in text.split(",") if s.strip()])
    return Options(
        export_dir=Path(args.export_dir), backends=parse_backends(args.backends) if args.backends else None,
        sizes=parse_sizes(args.sizes) if args.sizes else None, batch=args.batch,
        components=split(args.components) if args.components else None, reference_model=args.reference,
        linfusion=args.linfusion, random_weights=args.random_weights, end_to_end=args.end_to_end,
        save_reference=args.save_reference, load_reference=args.load_reference, checksums=args.checksums,
        providers=split(args.providers) if args.providers else None, seed=args.seed)


def preflight(args: argparse.Namespace, options: Options) -> None:
    """Output paths, extras and backends, checked before any model or reference is loaded."""
    if args.report is not None:
        check_output_file(args.report, "--report", (".json",))
    if args.save_reference is not None:
        if args.save_reference.suffix.lower() not in REFERENCE_SUFFIXES:
            raise CliError(f"--save-reference {args.save_reference} has suffix "
                           f"{args.save_reference.suffix!r}; name it FILE or FILE.npz (FILE.npz and FILE.json "
                           f"are written)")
        for path in reference_file.paths(args.save_reference):
            check_output_file(path, "--save-reference")
    if options.load_reference is not None:
        require_extras(FILE_REFERENCE_MODULES, GPU_EXTRAS, "--load-reference")
    else:
        try:
            require_extras(TORCH_REFERENCE_MODULES, "export", "the PyTorch reference")
        except MissingExtra as exc:
            raise MissingExtra(f"{exc}; or compare against a file saved with --save-reference on a machine "
                               f"with torch: --load-reference FILE") from None
    saving = options.save_reference is not None
    backends = options.backends if options.backends is not None else ([] if saving else list(BACKENDS))
    statuses = [backend_status(name, options.export_dir) for name in backends]
    if statuses and not any(s.available for s in statuses):
        reasons = "; ".join(f"{s.name}: {_reason(s)}" for s in statuses)
        raise CliError(f"no requested backend can run here: {reasons}")


def _reason(status) -> str:
    reason = status.reason or "unavailable"
    if status.name == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        reason += f"; {install_hint(GPU_EXTRAS)}"
    elif status.name == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        reason += f"; {install_hint('runtime')}"
    return reason


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.verbose:
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
    progress = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        options = options_from(args)
        preflight(args, options)
        report = validate(options, progress)
    except (ValidationInputError, CaseError, UnknownTargetError, CliError) as exc:
        cause = exc.__cause__
        if getattr(cause, "cli_hint", None):  # a model source error: the remedy in flags, not in API words
            return fail(PROG, f"{getattr(cause, 'problem', cause)}; {cause.cli_hint}", EXIT_BAD_INPUT)
        return fail(PROG, exc, EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return fail(PROG, "interrupted", EXIT_BAD_INPUT)
    if report.checks or report.end_to_end:
        print(report.table())
    if args.report is not None:
        try:
            report.write(args.report)
        except OSError as exc:
            print(report.summary())
            return fail(PROG, f"cannot write --report {args.report}: {exc}", EXIT_BAD_INPUT)
    print(report.summary())
    return EXIT_PASSED if report.passed else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
