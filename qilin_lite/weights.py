"""Safetensors files opened with one clear line: a truncated, empty or foreign file (a download cut short, a disk
that filled mid-save, an HTML error page saved under the name) is the user's to replace, never a traceback from
safetensors' reader.

In:  a `.safetensors` path, or a model / run / adapter directory holding them.
Out: an open file (`open_safetensors`), its tensors (`load_safetensors`), or nothing (`check_safetensors`, run
     before transformers or peft read a directory: they raise safetensors' own error with no file name).
safetensors checks the header (its size, its JSON, that the tensors' offsets cover the file exactly) when the file
is opened, so opening each file reads a few kB and finds a truncated one before any weight is loaded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from .errors import UserError


def unreadable(path, exc: BaseException, what: str = "weights") -> UserError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return UserError(f"{path}: cannot read these {what} ({reason}); the file is truncated or not safetensors: "
                     "copy, download or save it again")


@contextlib.contextmanager
def open_safetensors(path, what: str = "weights"):
    """`safe_open(path)` (torch tensors), whose failure to open is one UserError naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:  # OSError: unreadable; ValueError: a name with a NUL
        raise unreadable(path, e, what) from None
    with handle as h:
        yield h


def load_safetensors(path, what: str = "weights") -> dict:
    """Every tensor of one file (a projector, an adapter: small files)."""
    with open_safetensors(path, what) as h:
        return {k: h.get_tensor(k) for k in h.keys()}


def check_safetensors(source, what: str = "weights") -> None:
    """Open every `.safetensors` file of a local directory (headers only); a hub id or a missing path is left to
    the loader, which says so itself."""
    d = Path(source)
    if not d.is_dir():
        return
    for f in sorted(d.glob("*.safetensors")):
        with open_safetensors(f, what):
            pass
