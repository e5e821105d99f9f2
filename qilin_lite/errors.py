"""User-facing errors: one line naming the file, the record and the fix; the CLI prints them without a traceback."""

from __future__ import annotations

import re


class UserError(Exception):
    """A problem the user can fix (bad file, bad record, bad flag). Bugs stay ordinary exceptions."""

    exit_code = 2


# characters that must not reach a terminal raw from a file name or an id: C0/C1 controls (NUL, newline, escape
# sequences), the Unicode line and paragraph separators, and the bidirectional overrides that reorder what is shown
_HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text) -> str:
    """`text` with each control character escaped as Python's repr writes it (`\\n`, `\\x00`, `\\u2028`): a file
    named with a newline or a NUL prints as one line that says so, never as a forged second line."""
    return _HIDDEN.sub(lambda m: repr(m.group())[1:-1], str(text))


def where(path, line: int | None = None, record_id: str | None = None) -> str:
    """`file:line (id)` prefix used by every data error, so messages read alike everywhere (names made printable)."""
    out = printable(path)
    if line is not None:
        out += f":{line}"
    if record_id is not None:
        out += f" ({printable(record_id)})"
    return out


# what torch's checkpoint writer says when the disk fills mid-save: it reports positions, never ENOSPC
_TORCH_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed writing", "file write failed")


def disk_full(exc: BaseException) -> str | None:
    """A description of the full disk behind `exc` (or anything it was raised from), else None."""
    import errno
    import re

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return exc.strerror + (f": {exc.filename}" if exc.filename else "")
        if isinstance(exc, RuntimeError) and any(m in str(exc) for m in _TORCH_SHORT_WRITE):
            return "a checkpoint file could not be written to the end"
        if isinstance(exc, OSError) and exc.errno is None and re.fullmatch(r"\d+ requested and \d+ written", str(exc)):
            return "a file could not be written to the end"  # numpy's tofile (the GGUF writer) on a short write
        if "No space left on device" in str(exc):  # safetensors' writer (Rust) raises its own type with this text
            return "No space left on device"
        exc = exc.__cause__ or exc.__context__
    return None
