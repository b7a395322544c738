"""Process-level safety for commands that write files: termination signals and the umask.

SIGTERM (``kill``, systemd, Kubernetes) and SIGHUP (a closed terminal) kill a Python process
without running ``finally`` blocks, so an interrupted export would leave its staging folder
behind. Inside ``terminations_interrupt()`` they raise ``Terminated`` in the main thread
instead, a ``KeyboardInterrupt`` subclass, so the cleanup that already runs on Ctrl-C runs for
them too. Torch-free: only the standard library.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

TERMINATION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived; caught wherever KeyboardInterrupt is (never by ``except Exception``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """128 + the signal number, what a shell reports for a process the signal killed."""
        return 128 + self.signum

    def __str__(self) -> str:
        return f"terminated by {self.name}"


@contextmanager
def terminations_interrupt(signals: tuple[int, ...] = TERMINATION_SIGNALS) -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise ``Terminated`` in the main thread.

    Only signals whose disposition is the default (kill the process) are taken over: an ignored
    one stays ignored (``nohup`` ignores SIGHUP) and a handler the application installed stays in
    charge. An exception that leaves the block after such a signal leaves it as ``Terminated``
    (chained to it): code in between may have wrapped the signal's exception, as a C extension
    being imported turns it into ``ImportError``. The previous handlers are restored on exit.
    Outside the main thread Python cannot install handlers, and the block runs unchanged.
    """
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise Terminated(signum)

    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in signals:
            if signal.getsignal(signum) is signal.SIG_DFL:
                previous[signum] = signal.signal(signum, handler)
    try:
        yield
    except BaseException as exc:
        if received and not isinstance(exc, Terminated):
            raise Terminated(received[0]) from exc
        raise
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it,
    which would briefly affect files other threads create)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc (macOS): the only portable way; restored at once
    os.umask(mask)
    return mask


def normal_permissions(root: Path, umask: int | None = None) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir`` / ``open`` would have:
    folders 0o777 & ~umask, files 0o666 & ~umask (tempfile makes 0o700 folders, 0o600 files).
    Symbolic links are left alone."""
    mask = current_umask() if umask is None else umask
    folder_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    root = Path(root)
    if root.is_symlink():
        return
    if root.is_file():
        os.chmod(root, file_mode)
        return
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, folder_mode)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
