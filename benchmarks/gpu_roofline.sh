#!/usr/bin/env bash
# Prepared device check for the linear-attention kernels (about 2-3 min on an H200, < 4 min by design).
#
#   OUT=/some/dir bash benchmarks/gpu_roofline.sh              # the run tool sets $OUT
#   EXPERIMENTS=1 OUT=... bash benchmarks/gpu_roofline.sh      # + knob sweeps while the deadline allows
#
# 1. benchmarks/gpu_check.py --speed-only --json: fp16 speed of every tactic, time per kernel,
#    copy %, unfused torch and SDPA (16 rows) -> $OUT/speed.json, $OUT/speed.log.
# 2. If ncu (Nsight Compute) exists: one launch of each kernel at d=64, N=65536, fp16, B=2 (H=10),
#    both tactics, with the key sections -> $OUT/ncu_d64_n65536.{ncu-rep,txt,csv}.
# 3. If nvcc exists: benchmarks/kernel_registers.py for fp16 -> $OUT/registers.{txt,json}.
# 4. EXPERIMENTS=1 only: the docs/kernel_roofline.md knobs at d=64 (tensor-core tactic, fp16
#    correctness then speed), one JSON each: $OUT/exp_*.json.
# Every step has its own timeout and the whole run a deadline (DEADLINE seconds, default 225); a
# step that fails or times out is logged and the next one runs. Writes $OUT/summary.txt last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/roofline-out}
PY=${PYTHON:-python}
DEADLINE=${DEADLINE:-225}
mkdir -p "$OUT"
START=$SECONDS
log() { echo "[$((SECONDS - START)) s] $*" | tee -a "$OUT/summary.txt"; }
left() { echo $((DEADLINE - (SECONDS - START))); }
step() {  # step NAME MAX_SECONDS LOG COMMAND...: min(MAX, time left) s, output to LOG ("-": stdout)
    local name=$1 max=$2 out=$3 budget rc
    shift 3
    budget=$(left)
    (( budget > max )) && budget=$max
    if (( budget < 15 )); then log "$name: skipped, deadline"; return 0; fi
    log "$name: start (timeout ${budget} s)"
    if [[ $out == - ]]; then timeout --kill-after=5 "$budget" "$@"; else timeout --kill-after=5 "$budget" "$@" > "$out" 2>&1; fi
    rc=$?
    log "$name: exit $rc$([[ $rc == 124 || $rc == 137 ]] && echo ' (timed out)')"
    return 0
}

{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit --format=csv
  "$PY" -c "import cupy, sys; print('cupy', cupy.__version__, 'python', sys.version.split()[0])"
  "$PY" -c "import torch; print('torch', torch.__version__)"; } > "$OUT/machine.txt" 2>&1
log "machine: $(sed -n 2p "$OUT/machine.txt")"

step "speed table" 150 "$OUT/speed.log" "$PY" benchmarks/gpu_check.py --speed-only --json "$OUT/speed.json"
tail -n 20 "$OUT/speed.log"

if command -v ncu > /dev/null; then
    SECTIONS=(--section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis
              --section SchedulerStats --section WarpStateStats --section ComputeWorkloadAnalysis)
    step "ncu d=64 N=65536" 90 "$OUT/ncu.log" ncu --target-processes all --kernel-name regex:linfusion_la_ "${SECTIONS[@]}" \
        --export "$OUT/ncu_d64_n65536" --force-overwrite \
        "$PY" benchmarks/gpu_check.py --speed-only --profile --no-torch --dims 64 --tokens 65536
    if [[ -f "$OUT/ncu_d64_n65536.ncu-rep" ]]; then
        ncu --import "$OUT/ncu_d64_n65536.ncu-rep" --page details > "$OUT/ncu_d64_n65536.txt" 2>&1
        ncu --import "$OUT/ncu_d64_n65536.ncu-rep" --page details --csv > "$OUT/ncu_d64_n65536.csv" 2>&1
        grep -E "linfusion_la_|Registers Per Thread|Theoretical Occupancy|Achieved Occupancy|DRAM Throughput|Duration" \
            "$OUT/ncu_d64_n65536.txt" | head -n 60
    fi
else
    log "ncu not found: Nsight Compute profile skipped"
fi

if command -v nvcc > /dev/null; then
    step "registers" 60 "$OUT/registers.txt" "$PY" benchmarks/kernel_registers.py --dtypes float16 --grids \
        --json "$OUT/registers.json"
fi

if [[ "${EXPERIMENTS:-0}" == 1 ]]; then  # d=64, tensor-core: one knob at a time against the baseline rows
    # fp16 correctness at the same N first (the knobs change the compiled kernels), then speed
    COMMON=(--no-torch --dims 64 --tokens 16384,65536,262144 --dtypes float16 --tactics tensor-core)
    for exp in "base:" "rows1024:--apply-rows 1024" "apply3:--min-blocks apply_tc=3" \
               "state5:--min-blocks state_tc=5" "blocks2048:--state-blocks 2048"; do
        name=${exp%%:*}
        # shellcheck disable=SC2086
        step "experiment $name" 45 "$OUT/exp_$name.log" "$PY" benchmarks/gpu_check.py "${COMMON[@]}" ${exp#*:} \
            --json "$OUT/exp_$name.json"
    done
fi
log "done in $((SECONDS - START)) s; files in $OUT"
