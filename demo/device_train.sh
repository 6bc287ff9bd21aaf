#!/usr/bin/env bash
# Train the demo model on the device machine and score it, in one call of about 9 minutes.
# From a session that has the device tool:
#   run(command="bash demo/device_train.sh", carry=[".host/ComfyUI"], timeout_s=600)
# then, here: .venv/bin/python demo/train.py --run demo/runs/gpu --import-shards <files_at>
#             .venv/bin/python demo/train.py --run demo/runs/gpu --export demo/weights
# What comes back ($OUT, 8 files at most): the EMA networks as float32 shards, the caption
# encoder, the log, the held-out caption fidelity (JSON) and a grid of samples.
set -euo pipefail
export PYTHONUNBUFFERED=1 COMFYUI_PATH="$PWD/.host/ComfyUI"
MINUTES=${MINUTES:-6.5}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/log.txt"
python3 demo/train.py --run /tmp/demo-run --device cuda --batch-scale 8 --data-threads 4 --steps 1000000 \
    --max-minutes "$MINUTES" --save-minutes 1000 --log-every 200 --shards "$OUT" 2>&1 | tee -a "$OUT/log.txt"
cp /tmp/demo-run/fastattn_demo_text.safetensors "$OUT/"
python3 demo/evaluate.py --model /tmp/demo-run/fastattn_demo_wan.safetensors \
    --text /tmp/demo-run/fastattn_demo_text.safetensors --standalone cuda --captions 32 --tokens 1024 4096 \
    --grid "$OUT/grid.png" --json "$OUT/fidelity.json" 2>&1 | tee -a "$OUT/log.txt"
