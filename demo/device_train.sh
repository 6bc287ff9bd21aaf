#!/usr/bin/env bash
# Train demo model v2 (demo/train_wan.py) on the device machine and score it, in one call of about 9 minutes.
# From a session that has the device tool:
#   run(command="bash demo/device_train.sh", carry=[".host/ComfyUI"], timeout_s=600)
# then, here: .venv/bin/python demo/train_wan.py --run demo/runs/gpu --import-shards <files_at>
#             .venv/bin/python demo/evaluate.py --model demo/runs/gpu/fastattn_demo_wan.safetensors \
#                 --text demo/runs/gpu/fastattn_demo_wan_text.safetensors --captions 32 --tokens 1024 4096
# What comes back ($OUT, 8 files at most): the EMA networks as float32 shards, the caption
# encoder, the log, the held-out caption fidelity (JSON) and a grid of samples.
# The defaults are the device run; the variables shrink it for a check on a CPU, e.g.
#   OUT=/tmp/out RUN=/tmp/run DEVICE=cpu PYTHON=.venv/bin/python MINUTES=5 STEPS=3 BATCH_SCALE=0.004 \
#       SIDES=16 DATA_THREADS=1 THREADS=1 CAPTIONS=2 TOKENS=256 bash demo/device_train.sh
set -euo pipefail
export PYTHONUNBUFFERED=1 COMFYUI_PATH="${COMFYUI_PATH:-$PWD/.host/ComfyUI}"
PYTHON=${PYTHON:-python3} DEVICE=${DEVICE:-cuda} RUN=${RUN:-/tmp/demo-run} MINUTES=${MINUTES:-6.5}
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU: $DEVICE"; } \
    | tee "$OUT/log.txt"
# shellcheck disable=SC2086  # SIDES and TOKENS are lists
"$PYTHON" demo/train_wan.py --run "$RUN" --device "$DEVICE" --threads "${THREADS:-2}" --batch-scale "${BATCH_SCALE:-8}" \
    --data-threads "${DATA_THREADS:-4}" --steps "${STEPS:-1000000}" --sides ${SIDES:-16 32 48 64} \
    --max-minutes "$MINUTES" --save-minutes 1000 --log-every "${LOG_EVERY:-200}" --shards "$OUT" 2>&1 \
    | tee -a "$OUT/log.txt"
cp "$RUN/fastattn_demo_wan_text.safetensors" "$OUT/"
# shellcheck disable=SC2086
"$PYTHON" demo/evaluate.py --model "$RUN/fastattn_demo_wan.safetensors" \
    --text "$RUN/fastattn_demo_wan_text.safetensors" --standalone "$DEVICE" --threads "${THREADS:-2}" --captions "${CAPTIONS:-32}" \
    --tokens ${TOKENS:-1024 4096} --grid "$OUT/grid.png" --json "$OUT/fidelity.json" 2>&1 | tee -a "$OUT/log.txt"
