"""Writing a small file so that it is either whole or absent: a full disk or a kill mid-write never leaves half a
report or half a metrics file that a later command (or a person) would take as finished."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
