#!/usr/bin/env bash
# Create (or reuse) .venv with qilin-lite installed; sourced by demo.sh and test.sh.
# Without an NVIDIA GPU the CPU build of PyTorch is installed: a bare `torch` requirement would pull a multi-GB
# CUDA build. With a GPU, pip resolves torch from pyproject's range (a CUDA build, as GPU users want).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "$VPY" -m pip install -q "torch>=2.4,<3"
  elif probe=$(mktemp -d) && "$VPY" -m pip download -q --no-deps --no-index "torch==2.13.0" -d "$probe" >/dev/null 2>&1; then
    rm -rf "$probe"
    "$VPY" -m pip install -q "torch==2.13.0"  # a CPU wheel pip finds locally; its dependencies from the index
  else
    rm -rf "$probe"
    "$VPY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
fi
# installs nothing new once satisfied, so a second run starts in seconds
"$VPY" -m pip install -q -e ".[test]"
"$VPY" -c "import qilin_lite" >/dev/null
