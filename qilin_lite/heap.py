"""Freed memory back to the system: glibc keeps freed heap blocks for reuse, so a process's RSS stays at its peak.

Two callers: training, before DataLoader workers fork (each would map the record checks' freed pages; measured in
benchmarks/dataset_scale.py), and the web server after an image decode or a let-go image (its RSS stayed ~700 MB above what
the tabs keep).
"""

from __future__ import annotations

import contextlib
import functools


@functools.cache
def _libc():
    """The C library, looked up once: find_library runs `ldconfig -p` in a subprocess each time it is called."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory(collect: bool = False) -> None:
    """`malloc_trim(0)`; with `collect`, a garbage collection first (freed Python cycles reach the heap then)."""
    if collect:
        import gc

        gc.collect()
    with contextlib.suppress(AttributeError):  # not glibc (macOS, musl), or no C library found: nothing to trim
        _libc().malloc_trim(0)
