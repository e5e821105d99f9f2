"""User-facing errors: one line naming the file, the record and the fix; the CLI prints them without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad file, bad record, bad flag). Bugs stay ordinary exceptions."""

    exit_code = 2


def where(path, line: int | None = None, record_id: str | None = None) -> str:
    """`file:line (id)` prefix used by every data error, so messages read alike everywhere."""
    out = str(path)
    if line is not None:
        out += f":{line}"
    if record_id is not None:
        out += f" ({record_id})"
    return out
