#!/usr/bin/env bash
# Create ./.venv (Python 3.11) and install the package with its pinned dependencies, CPU or GPU machine alike.
# torch/torchvision are installed first with exact pins so pip takes the local wheels where they exist.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | { grep -v "^WARNING: Location" || true; }
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | { grep -v "^WARNING: Location" || true; }
.venv/bin/python -m pip check
.venv/bin/python -c "import torch, nerfstudio, diffusers, gen_lifting, factorized_seg; print('installed: torch', torch.__version__)"
