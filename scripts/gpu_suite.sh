#!/usr/bin/env bash
# The issue-20 GPU suite: our trainer and kohya sd-scripts on the same data, module set and precision,
# merged into one JSON with the speed-up ratios (docs/benchmarks.md, "GPU suite").
#
#   scripts/gpu_suite.sh OUT.json          full size on a GPU (SD1.5 512 px, SDXL 1024 px, iLECO 500 steps)
#   scripts/gpu_suite.sh OUT.json --cpu    CPU check of the plumbing: tiny models on our side, kohya's
#                                          real-size SD1.5 at 64 px for 3 steps (its U-Net has fixed sizes)
#
# Environment: PYTHON (default python3), TRAINTRAIN_SUITE_WORK (scratch folder, default
# /tmp/traintrain-gpu-suite; checkpoints are kept there between runs), TRAINTRAIN_KOHYA_DIR and
# TRAINTRAIN_KOHYA_DEPS (kohya's checkout and its pinned libraries; see scripts/kohya_bench.py).
set -uo pipefail
OUT=${1:?usage: scripts/gpu_suite.sh OUT.json [--cpu]}
MODE=${2:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${TRAINTRAIN_SUITE_WORK:-/tmp/traintrain-gpu-suite}
PY=${PYTHON:-python3}
cd "$ROOT" || exit 1
mkdir -p "$WORK"
start=$(date +%s)
stamp() { echo "[suite +$(( $(date +%s) - start ))s] $*" >&2; }

if [ "$MODE" = "--cpu" ]; then
    stamp "prepare (SD1.5 checkpoint, data, tokenizers)"
    $PY scripts/kohya_bench.py prepare --work "$WORK" --cases sd15 --resolution 64 --images 4 || exit 1
    stamp "ours (tiny)"
    $PY -m trainer bench --suite gpu --tiny --threads 1 --data "$WORK/data" --json "$WORK/ours.json" >/dev/null || exit 1
    stamp "kohya sd15 (real size, 64 px, fp32)"
    $PY scripts/kohya_bench.py run --work "$WORK" --case sd15 --steps 3 --warmup 1 --resolution 64 --batch 2 \
        --mixed-precision no --workers 1 --timeout 1800 --json "$WORK/kohya_sd15.json" >/dev/null
    KOHYA_JSONS=("$WORK/kohya_sd15.json")
else
    stamp "prepare (sd15 + sdxl checkpoints, 1024 px data, tokenizers)"
    $PY scripts/kohya_bench.py prepare --work "$WORK" --cases sd15,sdxl --resolution 1024 --images 8 || exit 1
    stamp "ours"
    $PY -m trainer bench --suite gpu --data "$WORK/data" --json "$WORK/ours.json" >/dev/null || exit 1
    stamp "kohya sd15"
    $PY scripts/kohya_bench.py run --work "$WORK" --case sd15 --steps 40 --resolution 512 --batch 2 \
        --mixed-precision bf16 --timeout 150 --json "$WORK/kohya_sd15.json" >/dev/null
    stamp "kohya sdxl"
    $PY scripts/kohya_bench.py run --work "$WORK" --case sdxl --steps 24 --resolution 1024 --batch 1 \
        --mixed-precision bf16 --timeout 200 --json "$WORK/kohya_sdxl.json" >/dev/null
    KOHYA_JSONS=("$WORK/kohya_sd15.json" "$WORK/kohya_sdxl.json")
fi
stamp "merge"
$PY scripts/kohya_bench.py merge --ours "$WORK/ours.json" --kohya "${KOHYA_JSONS[@]}" --out "$OUT" \
    --wall-s "$(( $(date +%s) - start ))"
stamp "done: $OUT"
