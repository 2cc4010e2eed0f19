#!/usr/bin/env bash
# Run the core and Web-UI tests on the hosts' stack: Python 3.10 + torch 2.1.2 (A1111 1.10), with
# Forge's diffusers/transformers for the tiny fixtures. Not part of CI: torch 2.1's PyPI wheel pulls
# ~3 GB of CUDA libraries. Usage: scripts/host_stack_tests.sh [python3.10]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3.10}
VENV=.venv-host-stack
[ -d "$VENV" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q "torch==2.1.2" "numpy<2" "pillow==9.5.0" safetensors tqdm "diffusers==0.31.0" "transformers==4.46.1" \
    "huggingface_hub==0.26.2" "peft==0.13.2" pytest pytest-timeout hypothesis pyyaml
pip install -q --no-deps "pytorch-optimizer==3.1.2"
# tests/models' bit-exact round trips need diffusers >= 0.32 (the standalone extra's floor); the loader
# variant tests run here too
python -m pytest -q -p no:cacheprovider tests/modes tests/data tests/webui tests/network tests/reliability tests/sampling \
    tests/models/test_model_variants.py tests/models/test_variant_training.py \
    tests/test_settings.py tests/test_presets.py tests/test_jobs.py tests/test_cli.py tests/test_architecture.py \
    tests/test_schedules.py tests/test_optim.py --deselect tests/network/test_diffusers_compat.py
