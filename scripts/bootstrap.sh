#!/usr/bin/env bash
# Create ./.venv and install spml-deploy into it (CPU build of torch), with optional extras.
#   bash scripts/bootstrap.sh            # runtime: torch (CPU), onnx + onnxruntime, faiss-cpu, HTTP service
#   bash scripts/bootstrap.sh dev        # + test tools
# Environment: VENV (default .venv), PYTHON (default python3),
#   TORCH_SPEC (default "torch==2.13.0"; set e.g. "torch" to let pip choose),
#   TORCH_INDEX (optional pip --index-url for torch, e.g. https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
extras="onnx,index,serve"
if [ "${1:-}" = "dev" ]; then extras="$extras,dev"; fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, on its own: the project's "torch>=2.1" range is then already satisfied and pip
# never pulls a multi-GB CUDA build in its place.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX:-}" ]; then
    $PIP install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX"
  else
    $PIP install -q "$TORCH_SPEC"
  fi
fi
$PIP install -q -e ".[$extras]"
echo "spml-deploy installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
