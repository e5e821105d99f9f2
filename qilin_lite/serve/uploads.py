"""Uploaded image bytes -> paths the image decoders can open, with nothing left on disk, even after a crash.

On Linux each upload lives in an anonymous memory file (memfd) and is opened through /proc/self/fd: it has no
name in any directory, and the kernel frees it when the server closes it or dies (the out-of-memory killer's
SIGKILL included), so a patient's file can never be read back afterwards. Elsewhere, and for the rare DICOM that
lacks the DICM magic (recognised only by its .dcm name), the bytes go to a private temporary folder in memory
(/dev/shm where there is one) named with this process's id, deleted once decoded; `remove_stale` deletes the
folders of servers that died before they could.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

PREFIX = "qilin-web-"
DICOM_NAME = (".dcm", ".dicom")


def scratch_root() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@contextlib.contextmanager
def held(uploads: list[tuple[str, bytes]]):
    """[(name, bytes)] -> the paths to decode them from, valid inside the `with` block only."""
    fds: list[int] = []
    folder: str | None = None
    try:
        paths = []
        for i, (name, data) in enumerate(uploads):
            suffix = Path(name).suffix.lower()
            named_dicom = suffix in DICOM_NAME and data[128:132] != b"DICM"
            if hasattr(os, "memfd_create") and not named_dicom:
                fd = os.memfd_create(f"upload{i}", getattr(os, "MFD_CLOEXEC", 0))
                fds.append(fd)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                paths.append(Path(f"/proc/self/fd/{fd}"))
            else:
                folder = folder or tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=scratch_root())
                # a neutral name: the user's file name stays out of any path; the suffix tells the decoder the kind
                p = Path(folder) / f"upload{i}{suffix if suffix.isascii() and suffix[1:].isalnum() else ''}"
                p.write_bytes(data)
                paths.append(p)
        yield paths
    finally:
        for fd in fds:
            os.close(fd)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


def remove_stale(root: str | None = None, legacy_age_s: float = 600) -> list[Path]:
    """Delete upload folders whose server died (its pid is gone), and old ones of earlier versions (no pid)."""
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
