"""What the four command-line tools share: checks made before anything is loaded.

An output path that cannot be written, or an optional dependency that is not installed, is
reported in one line (exit status 2) before a model is loaded, so that a typo costs a second,
not a generation or an export. Only the standard library is imported here (Pillow lazily, for
the image formats); no torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType

PACKAGE = "linfusion-deploy"
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
GPU_EXTRAS = ("gpu", "gpu-cu13")
_EXTRA_NOTES = {"gpu": "CUDA 12", "gpu-cu13": "CUDA 13, driver >= 580"}


class CliError(Exception):
    """A request a command refuses before doing any work; the message is one line."""


class MissingExtra(CliError):
    """A module of an optional extra is not installed; the message names the extra."""


def fail(prog: str, message: object, code: int = EXIT_BAD_INPUT) -> int:
    """Print ``prog: error: message`` on one line to stderr and return ``code``."""
    line = " ".join(str(message).split()) or "failed"
    print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
    return code


# --- optional extras -------------------------------------------------------------------------------

def install_hint(extra: str | Sequence[str]) -> str:
    """``pip install 'linfusion-deploy[EXTRA]'``; several extras are alternatives."""
    extras = [extra] if isinstance(extra, str) else list(extra)
    if len(extras) == 1:
        return f"pip install '{PACKAGE}[{extras[0]}]'"
    return "pip install " + " or ".join(
        f"'{PACKAGE}[{e}]'" + (f" ({_EXTRA_NOTES[e]})" if e in _EXTRA_NOTES else "") for e in extras)


def require_extra(module: str, extra: str | Sequence[str], what: str) -> ModuleType:
    """``module`` imported, or MissingExtra: "WHAT needs MODULE (reason): pip install '...[EXTRA]'"."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise MissingExtra(f"{what} needs {module.split('.')[0]} ({reason}): {install_hint(extra)}") from None


def require_extras(modules: Iterable[str], extra: str | Sequence[str], what: str) -> None:
    for module in modules:
        require_extra(module, extra, what)


# --- output paths ----------------------------------------------------------------------------------

def image_suffixes() -> tuple[str, ...]:
    """The image suffixes this Pillow can write (PNG and JPEG always; WebP when built with it)."""
    from PIL import Image

    Image.init()
    extensions = Image.registered_extensions()
    return tuple(s for s in IMAGE_SUFFIXES if extensions.get(s) in Image.SAVE)


def check_output_file(path: str | Path, option: str, suffixes: Sequence[str] | None = None) -> Path:
    """``path`` if a file can be written there: an allowed suffix (case-insensitive), not a
    directory, and a parent that is a writable directory or can be created."""
    path = Path(path).expanduser()
    if suffixes is not None and path.suffix.lower() not in suffixes:
        got = f"suffix {path.suffix!r}" if path.suffix else "no suffix"
        wanted = f"a {suffixes[0]} file" if len(suffixes) == 1 else f"one of {', '.join(suffixes)}"
        raise CliError(f"{option} {path} has {got}; use {wanted}")
    if path.is_dir():
        raise CliError(f"{option} {path} is a directory; name a file inside it")
    if path.exists() and not os.access(path, os.W_OK):
        raise CliError(f"{option} {path} exists and is not writable")
    _check_creatable(path.parent, option, path)
    return path


def check_output_dir(path: str | Path, option: str = "--output", *, force: bool = False,
                     reuse: bool = False) -> Path:
    """``path`` if a directory can be written there. An existing directory is refused unless
    ``force`` (it will be replaced: its parent must be writable) or ``reuse`` (written into)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise CliError(f"{option} {path} is a file, not a directory")
    if path.is_dir():
        if reuse:
            _check_creatable(path, option, path)
            return path
        if not force:
            raise CliError(f"{path} already exists; pass --force to replace it")
    _check_creatable(path.parent, option, path)
    return path


def _check_creatable(directory: Path, option: str, path: Path) -> None:
    """``directory`` exists and is writable, or its nearest existing ancestor is a writable
    directory (so that it can be created). Probed by creating a file: permission bits alone
    do not tell for root or read-only mounts."""
    existing = Path(os.path.abspath(directory))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CliError(f"{option} {path}: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".linfusion-write-check-", dir=existing)
    except OSError as exc:
        raise CliError(f"{option} {path}: cannot write in {existing} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def numbered_paths(output: Path, count: int) -> list[Path]:
    """``output`` for one image; ``stem_0.suffix``, ``stem_1.suffix`` ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(count)]


# --- help -----------------------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except the uninformative ``None``, ``False`` and ``""`` (those
    options say their default in words), and keeps the description and epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == "" or "(default" in text:
            return text
        return super()._get_help_string(action)


def exit_status_epilog(*lines: str) -> str:
    return "exit status:\n" + "\n".join(f"  {line}" for line in lines)
