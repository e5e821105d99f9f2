#!/usr/bin/env bash
# The test suite, offline and on the CPU: tiny models built from config, a tokenizer trained locally.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
