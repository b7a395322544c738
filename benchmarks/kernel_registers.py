"""Registers, spills, shared memory and theoretical occupancy of the linear-attention kernels.

    python benchmarks/kernel_registers.py                       # sm_90, d = 40 64 80 160
    python benchmarks/kernel_registers.py --dims 64,160 --grids # + blocks and waves at the GPU_RESULTS shapes
    python benchmarks/kernel_registers.py --min-blocks state_tc=2 --maxrregcount 96   # experiments

Compiles the translation unit that ``engines/kernel_build.py`` generates with
``nvcc -cubin -Xptxas -v`` (and, where ``cuobjdump`` is on PATH or $CUOBJDUMP, cross-checks with
``cuobjdump --dump-resource-usage``), then computes the theoretical occupancy per SM the way
CUDA's occupancy calculator does for an H100/H200 (sm_90: 65536 registers in 4 sub-partitions,
allocated per warp in units of 256; 64 warps, 32 blocks, 228 KiB shared memory with 1 KiB
reserved per block) for the block sizes of ``kernel_build.state_launch`` / ``apply_launch``.

``--min-blocks KIND=N`` rewrites the minBlocksPerMultiprocessor of one kernel family's
``__launch_bounds__`` in the generated source (in memory; the shipped files are not touched):
KIND is state, apply, state_tc, apply_tc or apply_tcw. ``--maxrregcount`` passes nvcc's flag
(ptxas ignores it for kernels with launch bounds; the report shows it). Without nvcc it says so
and exits 0. Imports nothing from the linfusion package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_kernel_build():
    spec = importlib.util.spec_from_file_location("linfusion_kernel_build", ROOT / "engines" / "kernel_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class SM:
    """Per-SM limits of one GPU (defaults: H100 / H200, sm_90)."""

    name: str = "H100/H200 (sm_90)"
    count: int = 132
    registers: int = 65536
    sub_partitions: int = 4
    reg_unit: int = 256
    max_regs_per_thread: int = 255
    max_warps: int = 64
    max_blocks: int = 32
    smem: int = 228 * 1024
    smem_per_block: int = 227 * 1024
    smem_reserved: int = 1024
    smem_unit: int = 128


H100 = SM()


def occupancy(regs: int, threads: int, smem: int, sm: SM = H100) -> dict:
    """Resident blocks per SM and the limiter, as cuda_occupancy.h computes them (no partitioned
    global caching; the largest shared-memory carveout). smem: static + dynamic bytes per block."""
    warps = -(-threads // 32)
    reg_warp = -(-regs * 32 // sm.reg_unit) * sm.reg_unit
    if regs > sm.max_regs_per_thread or reg_warp * warps > sm.registers:
        by_regs = 0
    else:
        by_regs = (sm.registers // sm.sub_partitions // max(reg_warp, 1)) * sm.sub_partitions // warps
    block_smem = -(-(smem + sm.smem_reserved) // sm.smem_unit) * sm.smem_unit
    by_smem = sm.smem // block_smem if smem <= sm.smem_per_block else 0
    limits = {"registers": by_regs, "shared memory": by_smem, "warps": sm.max_warps // warps,
              "blocks": sm.max_blocks}
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "registers"))
    return {"blocks": blocks, "warps": blocks * warps, "occupancy": blocks * warps / sm.max_warps,
            "limiter": limiter, "by_registers": by_regs, "by_smem": by_smem}


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage``: {kernel: {"REG": .., "STACK": .., "SHARED": .., ...}}.
    SHARED includes the 1 KiB the driver reserves per block on sm_80+."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"\s*Function\s+(\S+?):?\s*$", line):
            current = out.setdefault(m.group(1), {})
        elif current is not None and "REG:" in line:
            current.update({k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)})
    return out


FAMILIES = {"state": "linfusion_la_state_##", "apply": "linfusion_la_apply_##",
            "state_tc": "linfusion_la_state_tc_##", "apply_tc": "linfusion_la_apply_tc_##", "apply_tcw": "NAME("}
"""What the line after each ``__launch_bounds__`` in the kernel macros starts with."""


def with_min_blocks(source: str, min_blocks: dict[str, int]) -> str:
    """The source with minBlocksPerMultiprocessor of the named kernel families replaced."""
    lines = source.split("\n")
    seen = set()
    for i, line in enumerate(lines[:-1]):
        if "__launch_bounds__(" not in line or "#define" in line or i + 1 >= len(lines):
            continue
        family = next((f for f, start in FAMILIES.items() if lines[i + 1].strip().startswith(start)), None)
        if family in min_blocks:
            new, count = re.subn(r",\s*\d+\)(\s*\\?)$", f", {min_blocks[family]})\\1", line)
            if count != 1:
                raise SystemExit(f"cannot rewrite the launch bounds of {family}: {line.strip()}")
            lines[i] = new
            seen.add(family)
    missing = set(min_blocks) - seen
    if missing:
        raise SystemExit(f"no __launch_bounds__ found for {', '.join(sorted(missing))}; choose from {', '.join(FAMILIES)}")
    return "\n".join(lines)


@dataclass
class Row:
    kernel: str
    family: str
    dtype: str
    d: int
    threads: int
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int
    blocks_per_sm: int
    occupancy: float
    limiter: str
    cuobjdump_regs: int | None = None


def kernels(K, variants) -> list[tuple[str, str, str, int, int]]:
    """(name, family, dtype, d, threads per block) of every entry point, block sizes from the launch formulas."""
    out = {}
    for dtype, d in variants:
        t = K.tiling(d)
        for tactic in K.tactics(dtype, "sm_90", d):
            infix = {K.CUDA_CORE: "", K.TENSOR_CORE: "_tc", K.TENSOR_CORE_WIDE: "_tcw"}[tactic]
            state = K.state_launch(1, 1, 1, t, tactic=tactic).block[0]
            apply = K.apply_launch(1, 1, 1, t, tactic=tactic).block[0]
            state_family = "state" + ("_tc" if tactic != K.CUDA_CORE else "")
            out.setdefault(K.state_kernel(dtype, d, tactic), (state_family, dtype, d, state))
            out[K.apply_kernel(dtype, d, tactic)] = ("apply" + infix, dtype, d, apply)
    return [(name, *v) for name, v in out.items()]


def cuobjdump_path() -> str | None:
    return os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")


def report(K, variants, arch="sm_90", extra=(), min_blocks=None, sm: SM = H100) -> list[Row]:
    """One row per entry point of kernel_source(variants) (a list of (dtype, head dim))."""
    source = K.kernel_source(variants)
    if min_blocks:
        source = with_min_blocks(source, min_blocks)
    cubin, log = K.nvcc_compile(source, arch, "cubin", ["-Xptxas", "-v", *extra])
    ptxas = K.parse_ptxas(log)
    usage = {}
    if tool := cuobjdump_path():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            proc = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=False)
        usage = parse_resource_usage(proc.stdout) if proc.returncode == 0 else {}
    rows = []
    for name, family, dtype, d, threads in kernels(K, variants) + [(K.REDUCE_KERNEL, "reduce", "float32", 0, 256)]:
        p = ptxas[name]
        occ = occupancy(p.registers, threads, p.smem, sm)
        rows.append(Row(name, family, dtype, d, threads, p.registers, p.spill_stores, p.spill_loads, p.stack_frame,
                        p.smem, occ["blocks"], occ["occupancy"], occ["limiter"],
                        usage.get(name, {}).get("REG")))
    return rows


GRID_HEADS = {40: 8, 64: 10, 80: 8, 160: 8}
"""Heads per head dim in benchmarks/gpu_check.py's speed part (and /work/shared/GPU_RESULTS.md)."""


def grids(K, rows: list[Row], tokens=(16384, 65536, 262144), batch=2, sm: SM = H100) -> list[dict]:
    """Blocks of each fp16 launch at the GPU_RESULTS shapes, and waves = blocks / (blocks/SM x SMs)."""
    out = []
    by_name = {r.kernel: r for r in rows}
    for d in sorted({r.d for r in rows if r.d}):
        heads, t = GRID_HEADS.get(d, 8), K.tiling(d)
        for n in tokens:
            s = K.num_splits(n, batch, heads, t)
            for tactic in K.tactics("float16", "sm_90", d):
                for kind, launch in (("state", K.state_launch(s, batch, heads, t, tactic=tactic)),
                                     ("apply", K.apply_launch(n, batch, heads, t, tactic=tactic))):
                    name = (K.state_kernel if kind == "state" else K.apply_kernel)("float16", d, tactic)
                    if name not in by_name:
                        continue
                    blocks = launch.grid[0] * launch.grid[1]
                    per_sm = by_name[name].blocks_per_sm
                    out.append({"d": d, "H": heads, "N": n, "tactic": K.TACTIC_NAMES[tactic], "kernel": name,
                                "grid": f"{launch.grid[0]}x{launch.grid[1]}", "blocks": blocks, "splits": s,
                                "waves": blocks / max(per_sm * sm.count, 1)})
    return out


def print_rows(rows: list[Row]) -> None:
    print("| kernel | threads | regs | spill st/ld B | stack B | static smem B | blocks/SM | occupancy | limiter |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        regs = f"{r.regs}" + ("" if r.cuobjdump_regs in (None, r.regs) else f" (cuobjdump {r.cuobjdump_regs})")
        print(f"| {r.kernel} | {r.threads} | {regs} | {r.spill_stores}/{r.spill_loads} | {r.stack} | {r.smem} "
              f"| {r.blocks_per_sm} | {100 * r.occupancy:.1f} % | {r.limiter} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--dims", default="40,64,80,160", help="comma-separated head dims")
    p.add_argument("--dtypes", default="float16,bfloat16,float32", help="comma-separated kernel dtypes")
    p.add_argument("--min-blocks", action="append", default=[], metavar="KIND=N",
                   help=f"experiment: minBlocksPerMultiprocessor for one of {', '.join(FAMILIES)}")
    p.add_argument("--maxrregcount", type=int, help="experiment: nvcc -maxrregcount=N")
    p.add_argument("--grids", action="store_true", help="also blocks and waves at the GPU_RESULTS shapes (fp16, B=2)")
    p.add_argument("--json", type=Path, help="also write the rows (and grids) as JSON")
    args = p.parse_args(argv)
    K = load_kernel_build()
    if K.nvcc_path() is None:
        print("skipped: nvcc is not on PATH (install the CUDA toolkit to get the ptxas register report)")
        return 0
    try:
        min_blocks = {k: int(v) for k, v in (item.split("=", 1) for item in args.min_blocks)}
    except ValueError:
        raise SystemExit("--min-blocks takes KIND=N, e.g. --min-blocks state_tc=2") from None
    dims = tuple(int(x) for x in args.dims.split(","))
    extra = [f"-maxrregcount={args.maxrregcount}"] if args.maxrregcount else []
    variants = [(dtype, d) for dtype in args.dtypes.split(",") for d in dims]
    rows = report(K, variants, args.arch, extra, min_blocks)
    checked = [r for r in rows if r.cuobjdump_regs is not None]
    agree = sum(r.cuobjdump_regs == r.regs for r in checked)
    print(f"{args.arch}, {H100.name}: {H100.count} SMs; nvcc {' '.join(extra) or '(default flags)'}"
          f"{'; min blocks ' + str(min_blocks) if min_blocks else ''}; "
          + (f"cuobjdump agrees on the registers of {agree} of {len(rows)} kernels" if checked
             else "cuobjdump not found or unreadable: ptxas figures only"))
    print_rows(rows)
    grid_rows = grids(K, rows) if args.grids else []
    if grid_rows:
        print("\n| d | H | N | tactic | kernel | grid | blocks | waves |\n|---|---|---|---|---|---|---|---|")
        for g in grid_rows:
            print(f"| {g['d']} | {g['H']} | {g['N']} | {g['tactic']} | {g['kernel']} | {g['grid']} | {g['blocks']} "
                  f"| {g['waves']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "flags": extra, "min_blocks": min_blocks,
                                         "kernels": [asdict(r) for r in rows], "grids": grid_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
