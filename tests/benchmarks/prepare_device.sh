#!/usr/bin/env bash
# Fill .device/ (git-ignored) with what gpu_session.sh needs on the device machine, which reaches no
# network: Python wheels the device image lacks and a copy of the ComfyUI host. Run it here, in the
# checkout whose tree the device call sends, before that call (about 70 MB of downloads, once):
#
#     bash tests/benchmarks/prepare_device.sh
#
# Then the device call: command `bash tests/benchmarks/gpu_session.sh`, carry [".device"], timeout 600.
#
# What travels (the device tool's limit is 64 MiB with the tracked files, about 25 MiB):
#   comfyui.tar.gz                $COMFYUI_PATH or .host/ComfyUI, less tokenizers, tests and caches (1 MB)
#   wheels/torchsde, trampoline   ComfyUI's samplers import torchsde (pure Python, tiny)
#   wheels/comfy_kitchen          comfy-kitchen's CUDA build only (37 MB; its ROCm library, 158 MB, left out)
#   wheels/st_attn                Sliding Tile Attention's CUDA extension (FastVideo; 4 MB)
# The optional wheels (the last two) are carried in that order while the whole stays under
# LIMIT_MIB (default 62); .device/left_out.txt names any left out, and gpu_session.sh logs it.
# Never carried, so reported as "did not load": PyAV (40 MB; bench_e2e_gpu.py stands in for it),
# flash-attn and natten (PyPI has no binary wheels of them for this Python; building them from
# source takes far longer than a device call).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEVICE=.device
HOST=${COMFYUI_PATH:-.host/ComfyUI}
PYTHON=${PYTHON:-python3}
PINS=(torchsde==0.2.6 trampoline==0.1.2 comfy-kitchen==0.2.40 st-attn==0.0.7)
OPTIONAL=(comfy_kitchen st_attn)  # wheel name prefixes, in the order they are kept
LIMIT_MIB=${LIMIT_MIB:-62}
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)

[ -f "$HOST/main.py" ] || { echo "no ComfyUI at $HOST: run make setup or set COMFYUI_PATH" >&2; exit 1; }
rm -rf "$DEVICE" && mkdir -p "$DEVICE/download" "$DEVICE/wheels"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d "$DEVICE/download" "${PINS[@]}"

# Every wheel as downloaded, except comfy-kitchen: rewritten without its ROCm library (and that
# file's RECORD line), which the NVIDIA machine never loads and which would not fit the carry limit.
"$PYTHON" - "$DEVICE/download" "$DEVICE/wheels" <<'EOF'
import shutil, sys, zipfile
from pathlib import Path

source, target = Path(sys.argv[1]), Path(sys.argv[2])
for wheel in sorted(source.glob("*.whl")):
    if not wheel.name.startswith("comfy_kitchen-"):
        shutil.copy(wheel, target / wheel.name)
        continue
    skip = "comfy_kitchen/backends/hip/_C.abi3.so"
    with zipfile.ZipFile(wheel) as old, zipfile.ZipFile(target / wheel.name, "w", zipfile.ZIP_DEFLATED) as new:
        for item in old.infolist():
            if item.filename == skip:
                continue
            data = old.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(True) if not line.startswith(skip.encode()))
            new.writestr(item, data)
EOF
rm -rf "$DEVICE/download"

# The tokenizers' vocabularies (18 MB; no text encoder is built), tests, caches and user folders stay.
name=$(basename "$HOST")
tar czf "$DEVICE/comfyui.tar.gz" -C "$(dirname "$HOST")" --exclude=__pycache__ \
    --exclude="$name/comfy/sd1_tokenizer" --exclude="$name/comfy/text_encoders/*_tokenizer" \
    --exclude="$name/custom_nodes" --exclude="$name/tests" --exclude="$name/tests-unit" \
    --exclude="$name/models" --exclude="$name/output" --exclude="$name/user" "$name"

# What travels besides .device: tracked files and untracked ones git does not ignore.
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 cat | wc -c)
size() { du -cb "$@" | tail -1 | cut -f1; }
total=$(( tree + $(size "$DEVICE"/comfyui.tar.gz "$DEVICE"/wheels/torchsde-* "$DEVICE"/wheels/trampoline-*) ))
: >"$DEVICE/left_out.txt"
for name in "${OPTIONAL[@]}"; do
    wheel=$(ls "$DEVICE"/wheels/"$name"-*.whl)
    if (( total + $(size "$wheel") > LIMIT_MIB * 1048576 )); then
        echo "$name: left out, it would take what travels past ${LIMIT_MIB} MiB" | tee -a "$DEVICE/left_out.txt"
        rm "$wheel"
    else
        total=$(( total + $(size "$wheel") ))
    fi
done
ls -l "$DEVICE"/wheels "$DEVICE"/comfyui.tar.gz
echo "travels: $(( total / 1048576 )) MiB of the device call's 64 MiB (the tree $(( tree / 1048576 )) MiB, .device the rest)"
