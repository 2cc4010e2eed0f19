#!/usr/bin/env bash
# Build .gpu_carry/ (ignored by git) for the device machine, which has no internet: kohya sd-scripts' training
# code (from third_party/sd-scripts, never committed) and the wheels both sides miss there (Python 3.12, its
# torch/transformers/accelerate/torchvision/opencv are already installed). Run once, here, with internet:
#   KOHYA_SOURCE=https://github.com/kohya-ss/sd-scripts scripts/gpu_carry.sh   # or a local mirror path
# then, in the device run, carry ".gpu_carry" and start with scripts/gpu_device_run.sh (docs/benchmarks.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=${TRAINTRAIN_KOHYA_DIR:-$ROOT/third_party/sd-scripts}
DEST=$ROOT/.gpu_carry
PY=${PYTHON:-python3}
# KOHYA_SOURCE (a git URL or a local mirror) clones kohya first; large binaries it does not need are left out
# (a mirror may lack their objects: bitsandbytes_windows/ DLLs, configs/qwen3_06b/ tokenizer)
if [ ! -f "$SRC/train_network.py" ] && [ -n "${KOHYA_SOURCE:-}" ]; then
    git clone -q --no-checkout "$KOHYA_SOURCE" "$SRC"
    git -C "$SRC" sparse-checkout set --no-cone '/*' '!/bitsandbytes_windows/' '!/configs/qwen3_06b/' 2>/dev/null || true
    git -C "$SRC" checkout -q
fi
[ -f "$SRC/train_network.py" ] || { echo "kohya sd-scripts not found at $SRC (set KOHYA_SOURCE to clone it)" >&2; exit 1; }
rm -rf "$DEST/sd-scripts"
mkdir -p "$DEST/sd-scripts" "$DEST/wheels-ours" "$DEST/wheels-kohya"
# only what train_network.py / sdxl_train_network.py import: the entry points, library/ and networks/
cp "$SRC"/train_network.py "$SRC"/sdxl_train_network.py "$DEST/sd-scripts/"
cp -r "$SRC/library" "$SRC/networks" "$DEST/sd-scripts/"
git -C "$SRC" rev-parse HEAD > "$DEST/sd-scripts/COMMIT"
find "$DEST/sd-scripts" -name __pycache__ -prune -exec rm -rf {} +
download() {  # download DEST_DIR SPEC...: binary wheels for the device's CPython 3.12, no dependencies
    local dir=$1; shift
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$dir" "$@"
}
# ours: the standalone runtime's diffusers (the device image has none)
download "$DEST/wheels-ours" "diffusers==0.42.1" "importlib-metadata"
# kohya's pins that differ from the device image (transformers 5 dropped names kohya imports), and its small deps
download "$DEST/wheels-kohya" "transformers==4.54.1" "tokenizers==0.21.4" "huggingface-hub==0.34.3" \
    "diffusers==0.32.1" "accelerate==1.6.0" "toml==0.10.2" "voluptuous==0.15.2" "imagesize==1.4.1" \
    "ftfy==6.3.1" "wcwidth" "importlib-metadata"
du -sh "$DEST"/*
