"""A cache of ONNX Runtime's optimised models, so that a process does not re-optimise at every start.

Creating a session from an export's ONNX file parses it, copies every weight onto the heap and runs
ORT's graph optimisers. The first session made for a component writes its optimised graph into the
cache (``SessionOptions.optimized_model_filepath``) with the weights in an external data file,
which ORT maps into memory instead of copying when a later process loads it.

Where: ``cache_dir=`` (``Pipeline.from_export``), else ``$LINFUSION_CACHE``, else
``$XDG_CACHE_HOME/linfusion/ort`` (``~/.cache/linfusion/ort``). ``cache_dir=False`` or
``LINFUSION_CACHE=off`` disables it; deleting the directory clears it (it is rebuilt on demand).

Key: a sha256 over the manifest file's sha256, the component's file records (sha256 and size from
the manifest), the size and mtime of those files on disk, the ONNX Runtime version, the providers
with their options, every session setting that changes the optimised graph, and the CPU (model
and instruction-set flags: ``ORT_ENABLE_ALL`` lays convolutions out for the CPU it runs on).

Entry: ``<cache>/<key>/`` with ``model.onnx``, ``model.data`` and ``entry.json`` (size, mtime and
sha256 of both files). It is written in a temporary directory and renamed into place, so it is
complete or absent. On use the sizes and mtimes are always checked and, when the pipeline
verifies its export (the default), the sha256 too; an entry that fails a check or that ORT cannot
load is removed and rebuilt from the export. Least recently used entries are pruned beyond
``$LINFUSION_CACHE_MAX_GB`` (default 20).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_DIR = "LINFUSION_CACHE"
ENV_MAX = "LINFUSION_CACHE_MAX_GB"
OFF = ("", "0", "off", "false", "no", "none")
MODEL, DATA, ENTRY = "model.onnx", "model.data", "entry.json"
ENTRY_VERSION = 1
# Providers whose optimised graphs ORT can serialise; compiling providers (TensorRT, CoreML, ...)
# refuse ("contains compiled nodes"), so those sessions are made from the export as before.
CACHEABLE_PROVIDERS = frozenset({"CPUExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider"})


def resolve_dir(cache_dir: str | os.PathLike | bool | None = None) -> Path | None:
    """The cache directory to use, or None when caching is off."""
    if cache_dir is False:
        return None
    if cache_dir not in (None, True):
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_DIR)
    if env is not None:
        return None if env.strip().lower() in OFF else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "linfusion" / "ort"


def _sha256(path: Path) -> str:
    from .manifest import sha256_file

    return sha256_file(path)


def _stat(path: Path) -> dict[str, int]:
    """What changes whenever a file's content is written: any write moves ctime, which no
    utime call can set back."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino,
            "device": st.st_dev}


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def cpu_fingerprint() -> str:
    """The CPU model and its feature flags: what ORT's layout optimisations depend on."""
    parts = [platform.machine(), platform.system()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                parts.append(line.split(":", 1)[1].strip())
                if len(parts) >= 4:
                    break
    except OSError:
        parts.append(platform.processor())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass
class ModelCache:
    """The cache for one export directory (``attach`` makes it); the ORT backend asks it per component."""

    root: Path
    directory: Path
    manifest_sha256: str
    files: dict[str, dict[str, Any]]
    verify: bool = True
    events: list[tuple[str, str]] = field(default_factory=list)
    """(component, "hit" | "miss" | "rebuilt: why" | "off: why") in load order, for tests and logs."""

    def key(self, spec: Any, provider_setup: Any, session_setup: dict[str, Any]) -> str:
        import onnxruntime as ort

        sources = [p for p in (spec.path, spec.external_data) if p]
        parts = {
            "entry_version": ENTRY_VERSION, "manifest": self.manifest_sha256,
            "records": {p: self.files.get(p) for p in sources},
            "on_disk": {p: _stat(self.directory / p) for p in sources},
            "onnxruntime": ort.__version__, "providers": provider_setup, "session": session_setup,
            "cpu": cpu_fingerprint()}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]

    def lookup(self, component: str, key: str) -> Path | None:
        """The cached model's path when its entry passes the checks; a failing entry is removed."""
        entry = self.root / key
        if not entry.is_dir():
            self.events.append((component, "miss"))
            return None
        problem = self._check(entry)
        if problem:
            self.discard(component, key, problem)
            return None
        try:
            os.utime(entry / ENTRY)  # recency, for pruning
        except OSError:
            pass
        self.events.append((component, "hit"))
        return entry / MODEL

    def _check(self, entry: Path) -> str | None:
        try:
            record = json.loads((entry / ENTRY).read_text())
            for name, want in record["files"].items():
                path = entry / name
                stat = _stat(path)
                if stat["size"] != want["size"] or stat["mtime_ns"] != want["mtime_ns"]:
                    return f"{name} changed"
                if stat != want["stat"] and self.verify and _sha256(path) != want["sha256"]:
                    return f"{name} checksum mismatch"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"unreadable entry ({type(exc).__name__})"
        return None

    def discard(self, component: str, key: str, why: str) -> None:
        shutil.rmtree(self.root / key, ignore_errors=True)
        self.events.append((component, f"rebuilt: {why}"))

    def staging(self) -> Path | None:
        """A fresh temporary directory inside the cache for ORT to write an entry into."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=".partial-", dir=self.root))
        except OSError as exc:
            self.events.append(("*", f"off: {exc.strerror or exc}"))
            return None

    def commit(self, component: str, staged: Path, key: str) -> None:
        """Record the written files' checksums, then rename the entry into place (atomic)."""
        try:
            files = {}
            for name in (MODEL, DATA):
                path = staged / name
                if path.is_file():
                    _fsync(path)  # complete on disk before the rename publishes it
                    stat = _stat(path)
                    files[name] = {"size": stat["size"], "mtime_ns": stat["mtime_ns"], "sha256": _sha256(path),
                                   "stat": stat}
            if MODEL not in files:
                raise OSError("ONNX Runtime wrote no optimised model")
            (staged / ENTRY).write_text(json.dumps({"version": ENTRY_VERSION, "component": component,
                                                    "created": time.time(), "files": files}))
            os.replace(staged, self.root / key)  # a directory rename: fails if another process won
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)
            return
        self.prune()

    def prune(self, max_bytes: int | None = None) -> None:
        """Remove the least recently used entries while the cache is above its size limit."""
        if max_bytes is None:
            try:
                max_bytes = int(float(os.environ.get(ENV_MAX, "20")) * 2**30)
            except ValueError:
                max_bytes = 20 * 2**30
        entries = []
        for entry in self.root.iterdir():
            if entry.name.startswith(".partial-"):
                if time.time() - entry.stat().st_mtime > 24 * 3600:  # left by a killed process
                    shutil.rmtree(entry, ignore_errors=True)
                continue
            try:
                size = sum(p.stat().st_size for p in entry.iterdir())
                entries.append(((entry / ENTRY).stat().st_mtime, size, entry))
            except OSError:
                continue
        total = sum(size for _, size, _ in entries)
        for _, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= max_bytes:
                break
            shutil.rmtree(entry, ignore_errors=True)
            total -= size


def load_manifest(directory: str | os.PathLike, verify: bool, cache_dir: str | os.PathLike | bool | None = None):
    """``manifest.load_manifest`` with its sha256 check remembered per file: a file whose size, mtime,
    ctime and inode are those it had when it last matched its recorded sha256 is not hashed again
    (any write to it moves its ctime). Without a cache directory every file is hashed, as before."""
    from . import manifest as mf

    root = resolve_dir(cache_dir)
    if not verify or root is None:
        return mf.load_manifest(directory, verify=verify)
    directory = Path(directory)
    manifest = mf.load_manifest(directory, verify=False)  # its own digest, every file present, sizes
    memo_path = root / "verified" / f"{hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:40]}.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    stats = {name: _stat(directory / name) for name in manifest.files}
    todo = {name: record for name, record in manifest.files.items()
            if memo.get(name) != {"sha256": record["sha256"], "stat": stats[name]}}
    if todo:
        mf.verify_files(directory, manifest.with_files(todo), hashes=True)  # ManifestError names the file
        memo = {name: {"sha256": record["sha256"], "stat": stats[name]} for name, record in manifest.files.items()}
        _write_atomic(memo_path, json.dumps(memo))
    return manifest


def _write_atomic(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".partial-", delete=False) as handle:
            handle.write(text)
        os.replace(handle.name, path)
    except OSError:
        pass  # an unwritable cache only costs the next start its hashing


def attach(backend: Any, directory: Path, manifest: Any, cache_dir: str | os.PathLike | bool | None,
           verify: bool) -> ModelCache | None:
    """Give an ONNX Runtime backend the cache for this export (other backends are left alone)."""
    root = resolve_dir(cache_dir)
    if root is None or not hasattr(backend, "cache"):
        return None
    from .manifest import MANIFEST_NAME

    manifest_sha = hashlib.sha256((Path(directory) / MANIFEST_NAME).read_bytes()).hexdigest()
    backend.cache = ModelCache(root, Path(directory), manifest_sha, dict(manifest.files), verify)
    return backend.cache
