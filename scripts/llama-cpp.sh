#!/usr/bin/env bash
# llama.cpp for tests/test_gguf.py and benchmarks/gguf_vs_chat.py: llama-cpp-python (its libllama + libmtmd) built from
# its PyPI source with one upstream fix applied, into .venv. Run by test.sh after env.sh made .venv.
#
# The fix: llama.cpp's LLaVA graph appends CLIP's CLS embedding after the patches while its inputs still assume CLS
# first, so every patch gets its neighbour's position embedding, patch 0 is dropped and CLS reaches the LLM as an
# image token (ggml-org/llama.cpp issue 25814; fix: PR 25844, one line, not merged as of llama-cpp-python 0.3.36).
# Measured on the demo: llama.cpp's answers agree with `qilin-lite chat` on 84% of the held-out questions without
# it, 100% with it. The build takes minutes on two cores: the wheel is kept in a cache and reused.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LLAMA_CPP_PYTHON=0.3.36
FIX_FROM='ggml_concat(ctx0, inp, model.class_embedding, 1)'
FIX_TO='ggml_concat(ctx0, model.class_embedding, inp, 1)'
VPY=.venv/bin/python
MARK=.venv/.llama-cpp-$LLAMA_CPP_PYTHON-cls-first-generic
if [ -f "$MARK" ] && "$VPY" -c "import llama_cpp" 2>/dev/null; then
  exit 0
fi
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/qilin-lite/llama-cpp-$LLAMA_CPP_PYTHON-cls-first-generic
wheel=$(ls "$CACHE"/llama_cpp_python-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  echo "building llama.cpp (llama-cpp-python $LLAMA_CPP_PYTHON, with the CLS-order fix) once; this takes minutes" >&2
  work=$(mktemp -d)
  "$VPY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$work"
  tar xzf "$work"/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz -C "$work"
  src=$work/llama_cpp_python-$LLAMA_CPP_PYTHON
  graph=$src/vendor/llama.cpp/tools/mtmd/models/llava.cpp
  if ! grep -qF "$FIX_FROM" "$graph"; then  # a new version moved the line: look again rather than build blind
    echo "error: $graph no longer has the line the fix replaces; check issue 25814 and update scripts/llama-cpp.sh" >&2
    exit 1
  fi
  sed -i "s/$FIX_FROM/$FIX_TO/" "$graph"
  mkdir -p "$CACHE"
  # GGML_NATIVE=OFF (AVX2/FMA/F16C, what the registry's other builds assume): a -march=native build here uses AMX,
  # which this kind of virtual machine advertises but does not let a process use (SIGILL on the first q8_0 matmul)
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$VPY" -m pip wheel -q --no-deps "$src" -w "$CACHE"
  rm -rf "$work"
  wheel=$(ls "$CACHE"/llama_cpp_python-*.whl | head -1)
fi
"$VPY" -m pip install -q --force-reinstall --no-deps "$wheel"
"$VPY" -m pip install -q "diskcache>=5.6" "jinja2>=2.11" "typing-extensions>=4.5"  # its run-time dependencies
touch "$MARK"
