"""q8_0 / q4_k_m from the f16 file, by llama.cpp's own quantizer (llama-cpp-python's binding, or a
`llama-quantize` binary on PATH).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


QUANTS = ("f16", "q8_0", "q4_k_m")
LLAMA_FTYPES = {"q8_0": 7, "q4_k_m": 15}  # llama.h's LLAMA_FTYPE_MOSTLY_*
QUANTIZE_NAMES = {"q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}  # llama-quantize's names


def find_quantizer():
    """llama.cpp's quantizer: llama-cpp-python's binding, else a `llama-quantize` binary; None when neither."""
    try:
        import llama_cpp  # noqa: F401

        return "binding"
    except Exception:  # noqa: BLE001 - ImportError, or a library that fails to load: both mean "not usable"
        pass
    return shutil.which("llama-quantize")


def quantize(src: Path, dst: Path, quant: str, quantizer) -> None:
    import os
    import subprocess

    if quantizer == "binding":
        import ctypes

        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPES[quant]
        params.nthread = os.cpu_count() or 1
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    else:
        rc = subprocess.run([quantizer, str(src), str(dst), QUANTIZE_NAMES[quant]], capture_output=True).returncode
    if rc != 0 or not dst.is_file():
        raise RuntimeError(f"llama.cpp's quantizer failed ({rc}) on {src}")
