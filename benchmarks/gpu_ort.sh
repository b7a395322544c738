#!/usr/bin/env bash
# Device wrapper for benchmarks/gpu_ort.py: the runtime on ONNX Runtime's CUDA provider on the H200 machine.
#
# The H200 image has torch 2.11, CUDA 13 libraries (cuBLAS, cuDNN 9, cuFFT, cuRAND, NVRTC, runtime), onnx,
# onnxscript, onnx-ir 1.0, huggingface-hub 1.33, transformers, safetensors, tokenizers, accelerate and CPU
# onnxruntime 1.30, and no registry. What travels (.gitignore needs the line `/.device-carry/`):
#   .device-carry/wheels/   diffusers 0.42.1, polygraphy 0.53.6 (the export's parity/validation code imports it),
#                           onnx-ir 1.1.0 (the version the exporter is tested with); pure Python, about 7 MB
#   .device-carry/ort-N/    onnxruntime-gpu 1.31.1 (cp312, a CUDA 13 build, 255.6 MB) in 60 MiB parts, one a folder,
#                           each with SHA256SUMS (every part and the whole wheel)
# onnx-graphsurgeon is not carried: nothing on the export path imports it. The wheels install with --no-deps
# into /tmp (never into the image's site-packages); linfusion itself is imported from the checkout.
#
# 0. Here, on a machine that reaches PyPI, once: `bash benchmarks/gpu_ort.sh prepare` (it prints the part count;
#    below: 5 parts, 4 x 60 MiB and a 3.7 MiB one). `/.device-carry/` must be ignored (.gitignore or
#    .git/info/exclude), or the 255 MB would travel as untracked files and every call be refused (64 MiB).
#    Then the device tool's `status` (free): can_start_another true and budget_left_s >= 780.
# 1-4. Device calls, back to back, each issued as soon as the last returns (the machine goes back after 30 s
#    idle, and /tmp/gpu_ort with it). Times are estimates; nothing here has run on the H200 yet.
#    run(command="bash benchmarks/gpu_ort.sh stage", carry=[".device-carry/ort-1"], timeout_s=120)
#        machine start 1-2 min, then the transfer of 63 MB
#    run(command="bash benchmarks/gpu_ort.sh stage", carry=[".device-carry/ort-2"], timeout_s=120)   ~10-30 s
#    run(command="bash benchmarks/gpu_ort.sh stage", carry=[".device-carry/ort-3"], timeout_s=120)   ~10-30 s
#    run(command="bash benchmarks/gpu_ort.sh stage", carry=[".device-carry/ort-4"], timeout_s=120)   ~10-30 s
#    Each prints "parts: have K of 5". Fewer than the calls so far: a fresh machine was started in between;
#    carry the missing parts again.
# 5. run(command="bash benchmarks/gpu_ort.sh run", carry=[".device-carry/ort-5", ".device-carry/wheels"],
#        timeout_s=590)
#    ~30 s setup (join, check, install), then gpu_ort.py with a 480 s deadline: sd15 fp16 export (2-3 min
#    expected), runtime phase (until 100 s before the deadline), PyTorch phase (~1-1.5 min). Comes back:
#    $OUT/gpu_ort.json and .md (rewritten after every phase), gpu_ort.log, setup.log. Then give_back.
#    Total about 11-13 of the 15 device minutes. If the run was cut short and >= 6 min are left while the
#    machine is still warm, run step 5 again at once: it reuses the export in /tmp/gpu_ort/work (~5 min).
# Arguments after `run` go to gpu_ort.py (e.g. `run --sizes 1024,2048 --deadline 300`). PARITY=1 keeps the
# export's parity check (skipped by default to save time: PyTorch fp16 on the CPU is slow; the GPU run
# compares ORT with PyTorch at 4096 px and the whole image with the CPU provider instead).
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=${CARRY:-.device-carry}
STAGE=${STAGE:-/tmp/gpu_ort}
PY=${PYTHON:-python3}
PYV=${PYV:-3.12}  # the device's Python; another value only to try this script elsewhere
WHEEL=onnxruntime_gpu-1.31.1-cp${PYV/./}-cp${PYV/./}-manylinux_2_28_x86_64.whl
MODE=${1:-run}
shift || true

prepare() {  # here: download, split, checksum
    local pip=(--no-deps --only-binary=:all: --python-version "$PYV" --implementation cp --platform manylinux_2_28_x86_64
               --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    mkdir -p "$CARRY/wheels" "$CARRY/download"
    "$PY" -m pip download -q "${pip[@]}" -d "$CARRY/wheels" diffusers==0.42.1 polygraphy==0.53.6 onnx-ir==1.1.0 || exit 1
    "$PY" -m pip download -q "${pip[@]}" -d "$CARRY/download" onnxruntime-gpu==1.31.1 || exit 1
    rm -rf "$CARRY"/ort-* "$CARRY/parts" && mkdir -p "$CARRY/parts"
    split -b 60M -d -a 2 "$CARRY/download/$WHEEL" "$CARRY/parts/$WHEEL.part-"
    (cd "$CARRY/parts" && sha256sum "$WHEEL".part-* && cd ../download && sha256sum "$WHEEL") > "$CARRY/SHA256SUMS"
    local n=0 part
    for part in "$CARRY"/parts/*; do
        n=$((n + 1)); mkdir -p "$CARRY/ort-$n"; mv "$part" "$CARRY/ort-$n/"; cp "$CARRY/SHA256SUMS" "$CARRY/ort-$n/"
    done
    rmdir "$CARRY/parts"
    du -sh "$CARRY"/ort-* "$CARRY/wheels"
    echo "prepared $n parts; carry .device-carry/ort-1 .. ort-$((n - 1)) with 'stage', then ort-$n + wheels with 'run'"
}

stage() {  # device: keep each carried part in /tmp for the later calls
    mkdir -p "$STAGE/parts"
    local dir
    for dir in "$CARRY"/ort-*/; do
        [[ -d $dir ]] && cp -f "$dir"/*.part-* "$dir/SHA256SUMS" "$STAGE/parts/"
    done
    if [[ ! -f $STAGE/parts/SHA256SUMS ]]; then echo "parts: none carried or staged"; return 1; fi
    local want=0 have=0 name
    for name in $(grep -o "$WHEEL\.part-[0-9]*" "$STAGE/parts/SHA256SUMS"); do
        want=$((want + 1)); [[ -f $STAGE/parts/$name ]] && have=$((have + 1))
    done
    echo "parts: have $have of $want: $(cd "$STAGE/parts" && ls "$WHEEL".part-* 2>/dev/null | sed 's/.*part-//' | xargs)"
    [[ $have == "$want" ]]
}

install() {  # device: join and check the wheel, install everything under /tmp, link the image's CUDA libraries
    stage || { echo "missing parts: carry them with 'stage' first"; return 1; }
    if [[ ! -f $STAGE/ort/onnxruntime/__init__.py ]]; then
        (cd "$STAGE/parts" && sha256sum -c --quiet <(grep '\.part-' SHA256SUMS)) || { echo "a part is corrupt"; return 1; }
        cat "$STAGE/parts/$WHEEL".part-* > "$STAGE/$WHEEL"
        (cd "$STAGE" && grep " $WHEEL\$" parts/SHA256SUMS | sha256sum -c --quiet) || { echo "joined wheel corrupt"; return 1; }
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$STAGE/ort" "$STAGE/$WHEEL" \
            || return 1
        rm -f "$STAGE/$WHEEL"
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STAGE/site" \
        "$CARRY"/wheels/*.whl || return 1
    # preload_dlls() looks for nvidia/cu13/lib and nvidia/cudnn/lib beside the onnxruntime package: link the image's
    "$PY" - "$STAGE/ort/nvidia" <<'EOF' || return 1
import os, sys
import nvidia
target = sys.argv[1]
os.makedirs(target, exist_ok=True)
for root in nvidia.__path__:
    for name in os.listdir(root):
        if not os.path.lexists(os.path.join(target, name)) and os.path.isdir(os.path.join(root, name)):
            os.symlink(os.path.join(root, name), os.path.join(target, name))
print("nvidia libraries linked:", sorted(os.listdir(target)))
EOF
}

case $MODE in
    prepare) prepare ;;
    stage) stage; exit 0 ;;
    run)
        OUT=${OUT:-$PWD/gpu-ort-out}
        mkdir -p "$OUT"
        start=$SECONDS
        { nvidia-smi; install; } > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
        export PYTHONPATH="$STAGE/ort:$STAGE/site${PYTHONPATH:+:$PYTHONPATH}" LINFUSION_FROM_CHECKOUT=1 PYTHONUNBUFFERED=1
        libs=$(find -L "$STAGE/ort/nvidia" -maxdepth 2 -name lib -type d 2>/dev/null | paste -sd:)
        export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"  # if preload_dlls misses one
        "$PY" -c "import onnxruntime as o, diffusers, polygraphy, onnx_ir; o.preload_dlls();
print('onnxruntime', o.__version__, o.get_available_providers(), 'diffusers', diffusers.__version__)" \
            >> "$OUT/setup.log" 2>&1
        tail -n 3 "$OUT/setup.log"
        echo "setup: $((SECONDS - start)) s"
        reuse=()
        [[ -f $STAGE/work/gpu_ort_export.json ]] && reuse=(--skip-export "$STAGE/work")
        parity=(--skip-parity)
        [[ ${PARITY:-0} == 1 ]] && parity=()
        "$PY" -u benchmarks/gpu_ort.py --out "$OUT" --work "$STAGE/work" "${reuse[@]}" "${parity[@]}" "$@" \
            2>&1 | grep --line-buffered -v -e "torchvision is not installed" -e "return cls.__new__" | tee "$OUT/gpu_ort.log"
        status=${PIPESTATUS[0]}
        echo "gpu_ort.py exit $status after $((SECONDS - start)) s; files in $OUT"
        exit "$status" ;;
    *) echo "usage: bash benchmarks/gpu_ort.sh prepare|stage|run [gpu_ort.py arguments]"; exit 2 ;;
esac
