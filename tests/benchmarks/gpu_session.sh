#!/usr/bin/env bash
# One device call, about 9 minutes: the GPU numbers of BENCHMARKS.md. Prepare first, here:
# `bash tests/benchmarks/prepare_device.sh`; then the device tool's run with
#     command: bash tests/benchmarks/gpu_session.sh     carry: [".device"]     timeout_s: 600
# It installs the carried wheels (into /tmp/site: the device image's Python is left as it is),
# unpacks the carried ComfyUI, then runs, writing everything under $OUT (at most 8 files come back):
#   1. tests/benchmarks/bench_gpu.py --no-flex: kernel correctness (float32 / bfloat16 / float16
#      against float64 at odd shapes) and the kernel table against cuDNN / flash SDPA with the bound
#      and share-of-bound columns, tile-major keys, the other libraries side by side (cut at KERNEL_S);
#   2. tests/benchmarks/bench_e2e_gpu.py: the tiny-size check of every row, then whole sampling runs
#      of FLUX.1-dev, Wan 2.1 1.3B and SD3.5 Large in the time left (its --budget).
# Each step's log is in $OUT; the JSON files are rewritten as results come, so a cut run keeps them.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench-results}
TOTAL_S=${TOTAL_S:-540}  # the call's 600 s, less the margin for install, unpacking and the copy back
KERNEL_S=${KERNEL_S:-200}
started=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
    git log -1 --format='commit %H %s' 2>/dev/null || echo "commit: (no git metadata on the device)"
} >"$OUT/machine.txt" 2>&1

[ -s .device/left_out.txt ] && cat .device/left_out.txt >>"$OUT/machine.txt"
if [ -d .device/wheels ]; then
    for wheel in .device/wheels/*.whl; do  # one at a time: a wheel that does not install sinks no other
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$wheel" \
            >>"$OUT/machine.txt" 2>&1 || echo "pip could not install $wheel (see above)" >>"$OUT/machine.txt"
    done
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no .device/wheels: run tests/benchmarks/prepare_device.sh here first and carry .device" >>"$OUT/machine.txt"
fi
if [ -f .device/comfyui.tar.gz ]; then
    mkdir -p /tmp/host && tar xzf .device/comfyui.tar.gz -C /tmp/host
    COMFYUI_PATH=/tmp/host/$(tar tzf .device/comfyui.tar.gz | head -1 | cut -d/ -f1)
    export COMFYUI_PATH
fi
cat "$OUT/machine.txt"

timeout "$KERNEL_S" python3 tests/benchmarks/bench_gpu.py --no-flex --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
echo "bench_gpu.py: exit ${PIPESTATUS[0]} after $(( $(date +%s) - started )) s" | tee -a "$OUT/kernels.log"

left=$(( TOTAL_S - ($(date +%s) - started) ))
python3 tests/benchmarks/bench_e2e_gpu.py --budget "$left" --out "$OUT" 2>&1 | tee "$OUT/e2e.log"
echo "bench_e2e_gpu.py: exit ${PIPESTATUS[0]}; whole session $(( $(date +%s) - started )) s" | tee -a "$OUT/e2e.log"
