#!/usr/bin/env bash
# Run the TrainTrain tab's browser tests against the gradio versions the hosts ship:
# 3.41.2 (A1111 1.10) and 4.40.0 (Forge), each in its own venv (never --system-site-packages),
# plus the current interpreter (newest gradio, the standalone app's).
#
# Usage: scripts/run_browser_tests.sh [--setup-only] [g3] [g4] [current]   (default: g3 g4 current)
# Needs /usr/bin/chromium (apt-get install -y chromium). Venvs live in .venv-g3 / .venv-g4 (gitignored).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
SETUP_ONLY=0
TARGETS=()
for arg in "$@"; do
  case "$arg" in
    --setup-only) SETUP_ONLY=1 ;;
    g3|g4|current) TARGETS+=("$arg") ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(g3 g4 current)

setup_venv() {  # $1 = g3|g4
  local venv="$ROOT/.venv-$1" req
  case "$1" in
    g3) req="$ROOT/tests/ui/requirements-gradio3.txt" ;;
    g4) req="$ROOT/tests/ui/requirements-gradio4.txt" ;;
  esac
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import gradio, torch, playwright" 2>/dev/null; then
    return 0
  fi
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned to the local CPU wheel, so nothing later pulls another torch.
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
  "$venv/bin/python" -m pip install -q -r "$req"
  "$venv/bin/python" -m pip install -q --no-deps -e "$ROOT"
  "$venv/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
}

run_tests() {  # $1 = label, $2 = python
  echo "=== browser tests: $1 ($("$2" -c 'import gradio; print("gradio", gradio.__version__)')) ==="
  GRADIO_ANALYTICS_ENABLED=False TT_ARTIFACT_TAG="$1" "$2" -m pytest -m browser tests/ui -q -p no:cacheprovider
}

status=0
for t in "${TARGETS[@]}"; do
  if [ "$t" = current ]; then
    [ $SETUP_ONLY -eq 1 ] || run_tests current "$PY" || status=1
  else
    setup_venv "$t"
    [ $SETUP_ONLY -eq 1 ] || run_tests "$t" "$ROOT/.venv-$t/bin/python" || status=1
  fi
done
exit $status
