#!/usr/bin/env bash
# The device machine's whole check (issue 20), in one command: install the carried wheels (no internet
# there), run the gpu-marked tests, then the suite (ours + kohya, one JSON). Everything lands in $OUT.
#   device run: command "bash scripts/gpu_device_run.sh", carry [".gpu_carry"], timeout_s 580
# .gpu_carry/ is built here by scripts/gpu_carry.sh (docs/benchmarks.md, "GPU suite").
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
CARRY=.gpu_carry
PY=${PYTHON:-python3}
RESULTS=${OUT:-/tmp/traintrain-gpu-out}
mkdir -p "$RESULTS"
install() {  # install DIR WHEELS...: a private site folder, so the image's packages stay untouched
    local dir=$1; shift
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$dir" "$@"
}
install /tmp/site_ours "$CARRY"/wheels-ours/*.whl || exit 1
install /tmp/site_kohya "$CARRY"/wheels-kohya/*.whl || exit 1
export PYTHONPATH=/tmp/site_ours${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHON="$PY"
export TRAINTRAIN_KOHYA_DIR="$PWD/$CARRY/sd-scripts" TRAINTRAIN_KOHYA_DEPS=/tmp/site_kohya
WORK=${TRAINTRAIN_SUITE_WORK:-/tmp/traintrain-gpu-suite}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/gpu.txt"
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
timeout 140 "$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$RESULTS/gpu_tests.txt"
# SUITE_ARGS=--cpu (with SUITE_TIMEOUT) dry-runs this whole script on a machine without a GPU
timeout "${SUITE_TIMEOUT:-400}" bash scripts/gpu_suite.sh "$RESULTS/gpu_suite.json" ${SUITE_ARGS:-} 2>&1 | tee "$RESULTS/suite_log.txt"
tail -n 40 "$WORK/kohya_sd15.log" > "$RESULTS/kohya_sd15_tail.txt" 2>/dev/null
tail -n 40 "$WORK/kohya_sdxl.log" > "$RESULTS/kohya_sdxl_tail.txt" 2>/dev/null
cat "$RESULTS/gpu_suite.json" 2>/dev/null | "$PY" -c "import json,sys; print(json.dumps(json.load(sys.stdin)['goals'], indent=1))"
