#!/usr/bin/env bash
# The bundled demo end to end: synthetic data -> tiny base -> align -> tune --qlora -> held-out accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
OUT=${1:-demo-out/$(date +%Y%m%d-%H%M%S)}
.venv/bin/qilin-lite demo --out "$OUT"
