"""Uploaded files (base64 in the page's JSON) -> images decoded from memory, with nothing on disk, even after a crash.

Each upload stays a Python `bytes` object (`images.decode.InMemory`): PIL reads it through a BytesIO, pydicom too
(`force` for the DICOMs without a preamble, known by their .dcm name). It never has a name in any directory, so a
server killed while decoding (the out-of-memory killer's SIGKILL included) leaves no patient file behind: the
kernel frees its memory with the process. Earlier versions wrote some uploads to a folder in /dev/shm (named
`qilin-web-PID-...`); `remove_stale` deletes the ones whose server died before it could.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import UserError
from ..images.decode import InMemory

PREFIX = "qilin-web-"


def in_memory(files: list[dict], max_chars: int) -> list[InMemory]:
    """The page's `[{"name", "data": base64}]` -> the files' bytes under the names the user gave them (shown in
    messages; the suffix tells the decoder the kind). `max_chars`: the base64 one file may have."""
    out = []
    for i, f in enumerate(files):
        name = str(f.get("name") or f"image{i}")[:200]
        if len(f.get("data") or "") > max_chars:  # (the HTTP layer already refused larger bodies)
            raise UserError(f"{name}: larger than {max_chars * 3 // 4 // 2**20} MB; downscale it first")
        try:
            data = base64.b64decode(f.get("data") or "", validate=True)
        except ValueError:
            raise UserError(f"{name}: the upload arrived damaged; try again") from None
        if not data:
            raise UserError(f"{name}: empty file")
        out.append(InMemory(name, data))
    return out


def scratch_root() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def remove_stale(root: str | None = None, legacy_age_s: float = 600) -> list[Path]:
    """Delete upload folders earlier versions left: those whose server died (its pid is gone), and old ones of
    versions before that (no pid in the name)."""
    removed = []
    for d in Path(root or scratch_root() or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        rest = d.name[len(PREFIX):]
        pid = rest.split("-", 1)[0]
        try:
            alive = pid.isdigit() and _alive(int(pid))
            stale = not alive if pid.isdigit() and "-" in rest else time.time() - d.stat().st_mtime > legacy_age_s
        except OSError:
            continue
        if d.is_dir() and stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
