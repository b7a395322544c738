"""The linear-attention CUDA kernels: tiling, launch geometry, source and compilation.

One source of truth for everything that must agree between the kernels, the TensorRT AOT
plugins (``plugin.py``) and the GPU check (``benchmarks/gpu_check.py``):

* ``tiling(d)`` and ``tensor_core_tiling(d, wide)`` fix the per-head-dim template arguments of
  the kernel tactics (``tactics``: CUDA-core, and for fp16/bf16 on sm_80+ tensor-core and
  tensor-core-wide) and therefore the block sizes and static shared memory;
* ``state_launch`` / ``reduce_launch`` / ``apply_launch`` give grid and block as formulas in
  N, B and H, written against two small operators (ceil-div and min) so that the same code
  yields ints here and symbolic ``tensorrt.plugin`` expressions in the plugin;
* ``kernel_source`` generates the translation unit (the shipped ``kernels/*.cu`` plus one
  ``LINFUSION_DEFINE_KERNELS`` line per variant and, where those tactics exist, one
  ``LINFUSION_DEFINE_TC_KERNELS`` and one ``LINFUSION_DEFINE_TC_APPLY_KERNEL`` line), compiled
  by NVRTC (``compile_ptx``, at engine-build time) or nvcc (``nvcc_compile``, in the tests and
  the GPU check).

This module imports neither TensorRT nor any CUDA library at import time.
"""

from __future__ import annotations

import math
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

SOURCE_NAME = "linear_attention.cu"
SOURCE_FILES = (SOURCE_NAME, "tensor_core.cu", "linear_attention_tc.cu")
"""Concatenated in this order: CUDA-core kernels, tensor-core primitives, tensor-core kernels."""
DTYPES = ("float32", "float16", "bfloat16")
SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
IO_TRAITS = {"float32": "LinfusionF32", "float16": "LinfusionF16", "bfloat16": "LinfusionBF16"}
STANDARD_HEAD_DIMS = (40, 64, 80, 160)
"""SD-1.5 (40, 80, 160), SD-2.1 (64) and SD-XL (64) head dims; any other d works too."""
MAX_HEAD_DIM = 256
SHARED_MEMORY_LIMIT = 46 * 1024
"""Static shared memory per block stays below the 48 KiB that needs no opt-in: the AOT
launcher sets no cudaFuncAttributeMaxDynamicSharedMemorySize."""
STATE_CHUNK = 32
"""Tokens staged per iteration of the state kernel (LINFUSION_STATE_CHUNK in the source)."""
SPLIT_MIN_TOKENS = 256
TARGET_STATE_BLOCKS = 1024
REDUCE_THREADS = 256
REDUCE_KERNEL = "linfusion_la_reduce"
APPLY_ROWS = 256
"""Tokens per tensor-core apply block: the kv tile it converts once is reused over them."""

CUDA_CORE = 1
TENSOR_CORE = 2
TENSOR_CORE_WIDE = 3
"""Tactic ids (the plugins' TensorRT tactics): float32 FMA kernels, and mma.sync kernels with
float32 accumulation for fp16/bf16 I/O on sm_80 and newer."""
TACTIC_NAMES = {CUDA_CORE: "cuda-core", TENSOR_CORE: "tensor-core", TENSOR_CORE_WIDE: "tensor-core-wide"}
"""tensor-core-wide: the same state kernel, and an apply kernel tiled for wide column tiles
(fewer q re-reads, fewer warps) where that differs from the default tiling; TensorRT times both."""
TENSOR_CORE_MIN_ARCH = 80
TENSOR_CORE_MAX_HEAD_DIM = 192
"""The tensor-core state kernel keeps the D x D accumulators in registers; beyond 192 it spills."""
KERNEL_CHOICES = ("auto", "cuda-core", "tensor-core")
"""What ``linfusion-build --attention-kernels`` may restrict the tactics to."""


class KernelCompileError(RuntimeError):
    """NVRTC or nvcc rejected the kernel source; the message carries the compiler log."""


def _ceil4(x: int) -> int:
    return (x + 3) // 4 * 4


@dataclass(frozen=True)
class Tiling:
    head_dim: int
    state_cols: int
    """kv columns per state block (TJ_S, multiple of 4, >= 16)."""
    apply_cols: int
    """output columns per apply block (TJ_A, multiple of 4)."""
    apply_tokens: int
    """tokens per apply block (TOK, multiple of 4)."""

    @property
    def padded(self) -> int:
        return _ceil4(self.head_dim)

    @property
    def state_col_tiles(self) -> int:
        return math.ceil(self.head_dim / self.state_cols)

    @property
    def apply_col_tiles(self) -> int:
        return math.ceil(self.head_dim / self.apply_cols)

    @property
    def state_threads(self) -> int:
        return (self.padded // 4) * (self.state_cols // 4)

    @property
    def apply_threads(self) -> int:
        return (self.apply_tokens // 4) * (self.apply_cols // 4)

    @property
    def state_smem(self) -> int:
        return 4 * STATE_CHUNK * (self.padded + self.state_cols)

    @property
    def apply_smem(self) -> int:
        dp = self.padded
        return 4 * (dp * self.apply_cols + self.apply_tokens * (dp + 1) + dp + self.apply_tokens)

    @property
    def state_elements(self) -> int:
        """Floats per (b, h) in the state: D rows of D kv columns plus the mean column."""
        return self.head_dim * (self.head_dim + 1)


@dataclass(frozen=True)
class TensorCoreTiling:
    """Template arguments of the tensor-core kernels for one head dim."""

    head_dim: int
    apply_cols: int
    """output columns per apply block (TJ, multiple of 8)."""
    apply_tokens: int
    """tokens per apply pass, 16 per warp (TOK)."""
    apply_rows: int = APPLY_ROWS
    """tokens per apply block (ROWS, a multiple of TOK)."""

    @property
    def padded_k(self) -> int:
        return (self.head_dim + 15) // 16 * 16

    @property
    def padded_n(self) -> int:
        return (self.head_dim + 7) // 8 * 8

    @property
    def state_threads(self) -> int:
        return self.padded_k // 16 * 32

    @property
    def state_smem(self) -> int:
        return 2 * (STATE_CHUNK + 8) * (self.padded_k + self.padded_n)

    @property
    def apply_threads(self) -> int:
        return self.apply_tokens // 16 * 32

    @property
    def apply_smem(self) -> int:
        return 2 * (self.padded_k + 8) * (self.apply_cols + 8 + self.apply_tokens)

    @property
    def apply_col_tiles(self) -> int:
        return math.ceil(self.head_dim / self.apply_cols)


@cache
def tensor_core_tiling(head_dim: int, wide: bool = False) -> TensorCoreTiling:
    """Default: the most tokens per pass (128 down to 16), then the widest column tile that fits
    (many warps per block; d = 160 gets 64 tokens x 40 columns). wide: the widest column tile
    first, then the most tokens (fewer re-reads of q; d = 160 gets 32 tokens x 80 columns)."""
    if not 1 <= head_dim <= TENSOR_CORE_MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} is outside the tensor-core range 1..{TENSOR_CORE_MAX_HEAD_DIM}")
    dn = (head_dim + 7) // 8 * 8
    columns = [c for c in range(dn, 7, -8) if dn % c == 0]
    tokens = (128, 64, 32, 16)
    order = [(c, n) for c in columns for n in tokens] if wide else [(c, n) for n in tokens for c in columns]
    for cols, count in order:
        t = TensorCoreTiling(head_dim, cols, count, max(APPLY_ROWS, count))
        if t.apply_smem <= SHARED_MEMORY_LIMIT and t.state_smem <= SHARED_MEMORY_LIMIT:
            return t
    raise ValueError(f"no tensor-core tiling fits head dim {head_dim}")  # pragma: no cover


def _apply_tiling(head_dim: int, tactic: int) -> TensorCoreTiling:
    return tensor_core_tiling(head_dim, wide=tactic == TENSOR_CORE_WIDE)


def arch_number(arch: str) -> int:
    """80 for compute_80, sm_80 or sm_90a-style names (the letter suffix is ignored)."""
    match = re.fullmatch(r"(?:compute|sm)_(\d+)[a-z]?", arch)
    if match is None:
        raise ValueError(f"unknown GPU architecture {arch!r}; expected compute_XY or sm_XY")
    return int(match.group(1))


def tactics(dtype: str, arch: str = "compute_80", head_dim: int | None = None) -> tuple[int, ...]:
    """The kernel tactics that exist for an I/O dtype on an NVRTC/nvcc target (compute_XX /
    sm_XX). With a head dim, only the distinct ones (tensor-core-wide where its apply tiling
    differs); without, every tactic that may exist (what the plugins declare before d is known)."""
    if dtype not in DTYPES:
        raise ValueError(f"unsupported kernel dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "float32" or arch_number(arch) < TENSOR_CORE_MIN_ARCH:
        return (CUDA_CORE,)
    if head_dim is None:
        return (CUDA_CORE, TENSOR_CORE, TENSOR_CORE_WIDE)
    if head_dim > TENSOR_CORE_MAX_HEAD_DIM:
        return (CUDA_CORE,)
    if tensor_core_tiling(head_dim, wide=True) != tensor_core_tiling(head_dim):
        return (CUDA_CORE, TENSOR_CORE, TENSOR_CORE_WIDE)
    return (CUDA_CORE, TENSOR_CORE)


def kernel_tactic(tactic: int, dtype: str, arch: str, head_dim: int) -> int:
    """The kernels a declared tactic runs for one head dim: TensorRT's default tactic 0 and
    tactics that do not exist there fall back to the nearest that does (wide -> tensor-core ->
    CUDA-core)."""
    available = tactics(dtype, arch, head_dim)
    if tactic == TENSOR_CORE_WIDE and tactic not in available:
        tactic = TENSOR_CORE
    return tactic if tactic in available else CUDA_CORE


def _column_candidates(dp: int, cap: int) -> list[int]:
    """Multiples of 4 that divide dp, largest first, capped; then the cap itself and 32 and 16
    (column tiles that do not divide dp are padded; the kernels bound-check the columns)."""
    divisors = [c for c in range(min(dp, cap), 15, -4) if dp % c == 0]
    return list(dict.fromkeys(divisors + [min(dp, cap), 32, 16]))


@cache
def tiling(head_dim: int) -> Tiling:
    """The template arguments for one head dim (4 <= d <= 256)."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} is outside the supported range 1..{MAX_HEAD_DIM}")
    dp = _ceil4(head_dim)
    state_cols = next(c for c in _column_candidates(dp, 64)
                      if c >= 16 and (dp // 4) * (c // 4) <= 1024
                      and 4 * STATE_CHUNK * (dp + c) <= SHARED_MEMORY_LIMIT) if dp >= 16 else 16
    apply_candidates = ([dp] if dp <= 80 else []) + _column_candidates(dp, 64)
    for cols in apply_candidates:
        for tokens in (64, 32, 16):
            t = Tiling(head_dim, state_cols, cols, tokens)
            if t.apply_smem <= SHARED_MEMORY_LIMIT and t.apply_threads <= 1024:
                return t
    raise ValueError(f"no kernel tiling fits head dim {head_dim}")  # pragma: no cover


# --- launch geometry: the same formulas for ints and for tensorrt.plugin expressions ---------

def _int_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Launch:
    grid: tuple[Any, Any, Any]
    block: tuple[int, int, int]
    shared_mem: int = 0
    """Dynamic shared memory; the kernels use static shared memory only."""


def num_splits(tokens, batch, heads: int, t: Tiling, cdiv: Callable = _int_cdiv, minimum: Callable = min):
    """S, the number of token splits of the state kernel: about TARGET_STATE_BLOCKS blocks in
    all, and at least SPLIT_MIN_TOKENS tokens per split. Depends on shapes only."""
    return minimum(cdiv(tokens, SPLIT_MIN_TOKENS), cdiv(TARGET_STATE_BLOCKS, batch * (heads * t.state_col_tiles)))


def state_launch(splits, batch, heads: int, t: Tiling, *, tactic: int = CUDA_CORE) -> Launch:
    """CUDA-core grid (S * column tiles, B*H); tensor-core grid (S, B*H): one block covers all of kv."""
    if tactic in (TENSOR_CORE, TENSOR_CORE_WIDE):
        return Launch((splits, batch * heads, 1), (tensor_core_tiling(t.head_dim).state_threads, 1, 1))
    return Launch((splits * t.state_col_tiles, batch * heads, 1), (t.state_threads, 1, 1))


def reduce_launch(batch, heads, elements, cdiv: Callable = _int_cdiv) -> Launch:
    """``elements`` = D * (D + 1) floats per (b, h)."""
    return Launch((cdiv(elements, REDUCE_THREADS), batch * heads, 1), (REDUCE_THREADS, 1, 1))


def apply_launch(tokens, batch, heads: int, t: Tiling, cdiv: Callable = _int_cdiv, *,
                 tactic: int = CUDA_CORE) -> Launch:
    if tactic in (TENSOR_CORE, TENSOR_CORE_WIDE):
        tc = _apply_tiling(t.head_dim, tactic)
        return Launch((cdiv(tokens, tc.apply_rows) * tc.apply_col_tiles, batch * heads, 1),
                      (tc.apply_threads, 1, 1))
    return Launch((cdiv(tokens, t.apply_tokens) * t.apply_col_tiles, batch * heads, 1), (t.apply_threads, 1, 1))


def eps_bits(eps: float) -> int:
    """eps as the int32 whose bits are its float32 (the apply kernel's ``eps_bits`` argument)."""
    return struct.unpack("<i", struct.pack("<f", float(eps)))[0]


# --- names and source -------------------------------------------------------------------------

def _tactic_infix(tactic: int) -> str:
    if tactic not in TACTIC_NAMES:
        raise ValueError(f"unknown kernel tactic {tactic}")
    return {CUDA_CORE: "", TENSOR_CORE: "tc_", TENSOR_CORE_WIDE: "tcw_"}[tactic]


def state_kernel(dtype: str, head_dim: int, tactic: int = CUDA_CORE) -> str:
    """Both tensor-core tactics share one state kernel."""
    kernel_tactic = TENSOR_CORE if tactic == TENSOR_CORE_WIDE else tactic
    return f"linfusion_la_state_{_tactic_infix(kernel_tactic)}{SUFFIX[dtype]}_d{head_dim}"


def apply_kernel(dtype: str, head_dim: int, tactic: int = CUDA_CORE) -> str:
    return f"linfusion_la_apply_{_tactic_infix(tactic)}{SUFFIX[dtype]}_d{head_dim}"


def base_source() -> str:
    """The shipped kernel files (package data ``engines/kernels/*.cu``) in SOURCE_FILES order."""
    folder = Path(__file__).resolve().parent / "kernels"
    return "\n".join((folder / name).read_text() for name in SOURCE_FILES)


def kernel_source(variants: Iterable[tuple[str, int]]) -> str:
    """The translation unit defining the entry points of every tactic for each (dtype, head dim)."""
    lines = [base_source(), "", "// Generated by linfusion.engines.kernel_build.kernel_source"]
    for dtype, d in sorted(set(variants)):
        if dtype not in SUFFIX:
            raise ValueError(f"unsupported kernel dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        t = tiling(d)
        lines.append(f"LINFUSION_DEFINE_KERNELS({SUFFIX[dtype]}, {IO_TRAITS[dtype]}, {d}, "
                     f"{t.state_cols}, {t.apply_cols}, {t.apply_tokens})")
        available = tactics(dtype, "sm_90", d)
        if TENSOR_CORE in available:
            tc = tensor_core_tiling(d)
            lines.append(f"LINFUSION_DEFINE_TC_KERNELS({SUFFIX[dtype]}, {IO_TRAITS[dtype]}, {d}, "
                         f"{tc.apply_cols}, {tc.apply_tokens}, {tc.apply_rows})")
        if TENSOR_CORE_WIDE in available:
            tc = tensor_core_tiling(d, wide=True)
            lines.append(f"LINFUSION_DEFINE_TC_APPLY_KERNEL({apply_kernel(dtype, d, TENSOR_CORE_WIDE)}, "
                         f"{IO_TRAITS[dtype]}, {d}, {tc.apply_cols}, {tc.apply_tokens}, {tc.apply_rows})")
    return "\n".join(lines) + "\n"


def kernel_names(variants: Iterable[tuple[str, int]], arch: str = "compute_80") -> set[str]:
    """Every entry point ``kernel_source(variants)`` defines when compiled for ``arch``."""
    names = {REDUCE_KERNEL}
    for dtype, d in variants:
        for tactic in tactics(dtype, arch, d):
            names |= {state_kernel(dtype, d, tactic), apply_kernel(dtype, d, tactic)}
    return names


def all_variants(head_dims: Iterable[int] = STANDARD_HEAD_DIMS) -> list[tuple[str, int]]:
    return [(dtype, d) for dtype in DTYPES for d in head_dims]


# --- NVRTC (engine build time) ----------------------------------------------------------------

def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        try:
            from cuda import nvrtc  # cuda-python < 12.6 layout
        except ImportError as exc:
            raise KernelCompileError("NVRTC is unavailable: install cuda-python (pip install "
                                     "cuda-python) to compile the linear-attention kernels") from exc
    return nvrtc


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library: the PTX it writes loads on drivers of that CUDA
    version or newer."""
    nvrtc = _nvrtc()
    err, major, minor = nvrtc.nvrtcVersion()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise KernelCompileError(f"NVRTC is unusable: {err}")
    return major, minor


def compile_ptx(source: str, arch: str = "compute_80", name: str = SOURCE_NAME) -> bytes:
    """Compile with NVRTC (cuda-python's ``cuda.bindings.nvrtc``) to PTX for ``arch``."""
    nvrtc = _nvrtc()

    def check(result, what: str, prog=None) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            log = ""
            if prog is not None:
                _, size = nvrtc.nvrtcGetProgramLogSize(prog)
                buf = b" " * size
                nvrtc.nvrtcGetProgramLog(prog, buf)
                log = buf.decode(errors="replace").rstrip("\x00 \n")
            raise KernelCompileError(f"NVRTC {what} failed ({err}){': ' + log if log else ''}")
        return rest[0] if len(rest) == 1 else rest

    prog = check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "create")
    try:
        options = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"--fmad=true"]
        check(nvrtc.nvrtcCompileProgram(prog, len(options), options), "compile", prog)
        size = check(nvrtc.nvrtcGetPTXSize(prog), "get PTX size")
        ptx = b" " * size
        check(nvrtc.nvrtcGetPTX(prog, ptx), "get PTX")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return ptx.rstrip(b"\x00")


def ptx_entries(ptx: bytes | str) -> list[str]:
    """Names of the ``.entry`` functions (kernels) in a PTX module."""
    text = ptx.decode() if isinstance(ptx, bytes) else ptx
    return re.findall(r"\.entry\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(", text)


# --- nvcc (tests and the GPU check) -----------------------------------------------------------

def nvcc_path() -> str | None:
    return shutil.which("nvcc")


def nvcc_compile(source: str, arch: str, output: str = "ptx", extra: Iterable[str] = ()) -> tuple[bytes, str]:
    """Compile with nvcc; ``arch`` like ``sm_90``; ``output`` is ``ptx`` or ``cubin``.

    Returns the output bytes and nvcc's stderr (ptxas ``-v`` reports, warnings)."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise KernelCompileError("nvcc is not on PATH")
    if output not in ("ptx", "cubin"):
        raise ValueError("output must be 'ptx' or 'cubin'")
    with tempfile.TemporaryDirectory(prefix="linfusion-kernels-") as tmp:
        src = Path(tmp) / SOURCE_NAME
        src.write_text(source)
        out = Path(tmp) / f"out.{output}"
        cmd = [nvcc, f"--{output}", f"-arch={arch}", "-std=c++17", "-o", str(out), str(src), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise KernelCompileError(f"nvcc failed for {arch}: {proc.stderr.strip()}")
        return out.read_bytes(), proc.stderr


@dataclass
class PtxasReport:
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_frame: int = 0
    smem: int = 0


def parse_ptxas(log: str) -> dict[str, PtxasReport]:
    """Per-kernel register, spill and shared-memory figures from ``-Xptxas -v`` output."""
    reports: dict[str, PtxasReport] = {}
    current: PtxasReport | None = None
    for line in log.splitlines():
        if (m := re.search(r"Function properties for (\S+)", line)) or (m := re.search(r"Compiling entry function '([^']+)'", line)):
            current = reports.setdefault(m.group(1), PtxasReport())
        elif current is not None and "spill stores" in line:
            nums = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if nums:
                current.stack_frame, current.spill_stores, current.spill_loads = map(int, nums.groups())
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current.registers = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                current.smem = int(s.group(1))
    return reports
