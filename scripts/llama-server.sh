#!/usr/bin/env bash
# llama.cpp's own OpenAI-compatible server, llama-server, for tests/test_eval_endpoint.py (eval --endpoint through
# llama.cpp, the GGUF export's template and media marker as llama.cpp renders them). Built from the same llama.cpp
# source and the same one-line fix as scripts/llama-cpp.sh (see there), statically linked, into .venv/bin; the
# binary is cached and reused. Run by test.sh; where it cannot be built, those tests skip and say why.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LLAMA_CPP_PYTHON=0.3.36
FIX_FROM='ggml_concat(ctx0, inp, model.class_embedding, 1)'
FIX_TO='ggml_concat(ctx0, model.class_embedding, inp, 1)'
VPY=.venv/bin/python
TARGET=.venv/bin/llama-server
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/qilin-lite/llama-server-$LLAMA_CPP_PYTHON-cls-first-generic
if [ -x "$TARGET" ] && "$TARGET" --version >/dev/null 2>&1; then
  exit 0
fi
if [ ! -x "$CACHE/llama-server" ]; then
  echo "building llama-server (llama.cpp from llama-cpp-python $LLAMA_CPP_PYTHON, with the CLS-order fix) once; this takes minutes" >&2
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$VPY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$work"
  tar xzf "$work"/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz -C "$work"
  src=$work/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp
  graph=$src/tools/mtmd/models/llava.cpp
  if ! grep -qF "$FIX_FROM" "$graph"; then
    echo "error: $graph no longer has the line the fix replaces; check issue 25814 and update scripts/llama-server.sh" >&2
    exit 1
  fi
  sed -i "s/$FIX_FROM/$FIX_TO/" "$graph"
  # GGML_NATIVE=OFF for the reason scripts/llama-cpp.sh gives (AMX advertised, not usable: SIGILL)
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TOOLS=ON >/dev/null
  cmake --build "$work/build" --target llama-server -j "$(nproc)" >/dev/null
  mkdir -p "$CACHE"
  cp "$work/build/bin/llama-server" "$CACHE/llama-server"
fi
cp "$CACHE/llama-server" "$TARGET"
"$TARGET" --version >/dev/null 2>&1
