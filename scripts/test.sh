#!/usr/bin/env bash
# The test suite, offline and on the CPU: tiny models built from config, a tokenizer trained locally.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# llama.cpp for the GGUF export tests: built once (minutes) with an upstream fix, then reused; where it cannot be
# built (no C++ compiler) those tests skip and say why
bash scripts/llama-cpp.sh || echo "note: llama.cpp could not be built; the GGUF tests that run it will be skipped" >&2
# llama-server, llama.cpp's own OpenAI-compatible server, for `eval --endpoint` and the served-prompt tests
bash scripts/llama-server.sh || echo "note: llama-server could not be built; the tests that serve through it will be skipped" >&2
# tests/test_web.py drives the page in Debian's chromium (Playwright's own browser download cannot be reached):
# install it where this machine can (root with apt-get); elsewhere those tests skip and say why
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "note: chromium could not be installed; the browser tests will be skipped" >&2
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
