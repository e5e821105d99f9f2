"""Stored pixel values (16-bit, float, Hounsfield units) -> 0..255, as a window or the data's own range.

float64 math a slice at a time: the whole of a 128 MB 16-bit image at once took 2 GB of temporaries in the web
server (benchmarks/web_memory.py); the values are identical either way.
"""

from __future__ import annotations

import numpy as np

SLICE = 1 << 20


def window_bounds(window: tuple[float, float]) -> tuple[float, float]:
    # DICOM PS3.3 C.11.2.1.2.1 "LINEAR", the formula viewers use, so a window copied from a viewer looks the same.
    center, width = window
    return center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2


def _slices(values: np.ndarray):
    flat = values.reshape(-1)
    for start in range(0, flat.size, SLICE):
        yield start, flat[start : start + SLICE].astype(np.float64)


def data_bounds(values: np.ndarray) -> tuple[float, float]:
    lo = hi = None
    for _, v in _slices(values):
        v = v[np.isfinite(v)]
        if v.size:
            lo, hi = min(v.min(), lo if lo is not None else np.inf), max(v.max(), hi if hi is not None else -np.inf)
    return (0.0, 0.0) if lo is None else (float(lo), float(hi))


def to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map lo -> 0, hi -> 255, clipped; a flat image (hi == lo) comes out black."""
    out = np.empty(values.size, np.uint8)
    for start, v in _slices(values):
        scaled = (v - lo) * (255.0 / (hi - lo)) if hi > lo else np.where(v > lo, 255.0, 0.0)
        scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
        out[start : start + v.size] = np.clip(np.rint(scaled), 0, 255)
    return out.reshape(values.shape)
