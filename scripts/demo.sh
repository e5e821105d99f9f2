#!/usr/bin/env bash
# The bundled demo end to end: synthetic data -> tiny base -> align -> tune --qlora -> held-out accuracy.
#   bash scripts/demo.sh [OUT] [--family qwen2.5-vl] [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
OUT=demo-out/$(date +%Y%m%d-%H%M%S)
if [[ $# -gt 0 && $1 != -* ]]; then OUT=$1; shift; fi  # the output directory first, as before; the rest is demo's
.venv/bin/qilin-lite demo --out "$OUT" "$@"
