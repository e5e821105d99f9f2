#!/usr/bin/env bash
# Validate a lent GPU in one command, offline, in under 10 minutes on one H200-class GPU: the demo on the GPU,
# chat / eval / web placement for real, QLoRA (bitsandbytes' CUDA kernels) and LoRA steps at the paper's 13B shapes,
# and the planner against measured peaks at three sizes. Writes gpu-check.json and gpu-check.md into $OUT (or
# gpu-check-out/) and exits 1 if a check failed. check.py beside this script says what each check measures;
# scripts/gpu-check.sh, the entry point README and issues name, runs this script.
#
#   bash scripts/gpu-check.sh --fetch-wheels   # once, where pip reaches PyPI: the wheels below into .whl/
#   bash scripts/gpu-check.sh                  # on the GPU machine (torch, transformers, peft, accelerate there)
#   bash scripts/gpu-check.sh --toy            # toy sizes, any device (what tests/test_benchmarks_smoke.py runs)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl -r scripts/gpu-wheels.txt
  du -sh .whl
  exit 0
fi
if compgen -G ".whl/*.whl" >/dev/null; then  # what the GPU machine lacks, installed beside it (never over it)
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
for mod in torch transformers peft accelerate trl bitsandbytes datasets; do
  "$PY" -c "import $mod" 2>/dev/null || { echo "gpu-check: python module '$mod' is missing; see scripts/gpu-wheels.txt" >&2; exit 2; }
done
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu.check --out "${OUT:-gpu-check-out}" "$@"
