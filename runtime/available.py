"""How much memory a generation may use: host memory (MemAvailable, capped by the cgroup's limit)
or free GPU memory, and memory sizes as people write them ("12G"). Torch-free, standard library only;
``runtime.memory`` (the guard) re-exports these names."""

from __future__ import annotations

import os
import re
from pathlib import Path

_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_memory(text: str | int) -> int:
    """"12G", "800M", "1.5GiB", "2048" (bytes) -> bytes. As in GNU coreutils: K/M/G/T and
    KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB powers of 1000."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match and match.group(2).lower()
        if not match or unit not in _UNITS:
            raise ValueError(f"cannot read memory size {text!r}; write e.g. 12G, 800M, 1.5GiB or a number "
                             f"of bytes")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}; write e.g. 12G, 800M or 1.5GiB")
    return value


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _inactive_file(stat: Path, key: str) -> int:
    try:
        for line in stat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_available(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")) -> int | None:
    """Limit minus usage (less reclaimable page cache) of this process's memory cgroup, v2 or v1;
    None when no limit applies. Every ancestor with a limit is considered."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base, limit_name, usage_name, stat_key = root, "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):
            base, limit_name, usage_name, stat_key = (root / "memory", "memory.limit_in_bytes",
                                                      "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        rel = Path(path.lstrip("/"))
        for folder in {base / p for p in (rel, *rel.parents)}:
            limit, usage = _read_int(folder / limit_name), _read_int(folder / usage_name)
            if limit is None or usage is None or limit >= 2**60:
                continue
            free = limit - max(usage - _inactive_file(folder / "memory.stat", stat_key), 0)
            best = free if best is None else min(best, free)
    return None if best is None else max(best, 0)


def host_available() -> int:
    """MemAvailable from /proc/meminfo, capped by a cgroup limit; os.sysconf where there is no /proc."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limited = cgroup_available()
    return available if limited is None else min(available, limited)


def gpu_available(device: int = 0) -> int:
    """Free memory of CUDA device ``device`` (cudaMemGetInfo through cuda-python)."""
    from .memory import MemoryGuardError

    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
    except ImportError as exc:
        raise MemoryGuardError("cannot read free GPU memory: cuda-python is not installed; install it or "
                               "pass memory_limit=... (--memory-limit)") from exc
    err, *_ = cudart.cudaSetDevice(device)
    err2, free, _total = cudart.cudaMemGetInfo()
    if int(err) or int(err2):
        raise MemoryGuardError(f"cannot read free GPU memory (CUDA error {int(err) or int(err2)}); pass "
                               f"memory_limit=... (--memory-limit)")
    return int(free)


def available_bytes(backend: str = "onnxruntime") -> int:
    """What a request may use: free GPU memory for tensorrt, else the host's available memory."""
    return gpu_available() if backend == "tensorrt" else host_available()
