"""What a recipe setting may be: each field in config.py declares its rule beside itself with `setting(default,
rule)`, and `check_fields` holds every field of a section to its annotated type and its rule.

In:  a dataclass whose fields were declared with `setting`.
Out: nothing, or a UserError of one line naming the field and what it may be (`train.lr must be a number above 0,
not nan`). A field declared without a rule is a bug, raised on the first construction, so no setting can be added
unchecked (tests/test_recipe_fuzz.py also checks every field by name).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .errors import UserError

COUNT_MAX = 2**31 - 1  # steps and counts end in trackers and JSON as 32-bit ints; no run needs more


@dataclass(frozen=True)
class Rule:
    allowed: str | Callable[[], str]  # what the message says a value may be (a callable: read when needed)
    ok: Callable[[Any], bool]

    def describe(self) -> str:
        return self.allowed() if callable(self.allowed) else self.allowed


def setting(default: Any, rule: Rule) -> Any:
    """A dataclass field with its rule (`lr: float = setting(1e-3, number(0, lo_open=True))`)."""
    return field(default=default, metadata={"rule": rule})


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           why: str = "") -> Rule:
    """A finite number in [lo, hi] (either end open or absent); `why` says what the bounds protect."""
    def ok(v) -> bool:
        if isinstance(v, float) and not math.isfinite(v):  # (an int is finite, and may be too large for a float)
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return hi is None or (v < hi if hi_open else v <= hi)

    if lo is not None and hi is not None:
        text = f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"a number {'above' if lo_open else 'of at least'} {_num(lo)}"
    elif hi is not None:
        text = f"a number {'below' if hi_open else 'of at most'} {_num(hi)}"
    else:
        text = "a finite number"
    return Rule(text + (f" ({why})" if why else ""), ok)


def choice(names: Iterable[str] | Callable[[], Iterable[str]]) -> Rule:
    """One of `names` (a callable: asked when a value is checked, for lists another package owns)."""
    listed = names if callable(names) else (lambda fixed=tuple(names): fixed)
    return Rule(lambda: "one of " + ", ".join(listed()), lambda v: v in tuple(listed()))


def _one_line(v: str) -> bool:
    return bool(v.strip()) and not any(ord(c) < 32 or ord(c) == 127 for c in v)


def _path_like(v: str) -> bool:
    # what the file system can look up at all (PATH_MAX, NAME_MAX on Linux): a longer name is an OSError, not
    # "not found", wherever it is first touched
    return _one_line(v) and len(v.encode("utf-8", "surrogateescape")) <= 4096 and all(
        len(part.encode("utf-8", "surrogateescape")) <= 255 for part in v.split("/"))


TEXT = Rule("a non-empty name on one line", _one_line)  # control characters (NUL) break open() and logs
PATH = Rule("a path or hub id on one line (at most 4096 bytes, 255 per part)", _path_like)
ANY_TEXT = Rule("text", lambda v: True)
FLAG = Rule("true or false", lambda v: True)  # the type check is the whole rule

_TYPE_NAMES = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "text"}


def kind_of(f: dataclasses.Field) -> tuple[str, bool]:
    """(bool | int | float | str, whether None is allowed) from a field's annotation (a string under
    `from __future__ import annotations`)."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    parts = [p.strip() for p in t.split("|")]
    return parts[0], "None" in parts


def _is(kind: str, v: Any) -> bool:
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, str)


def check_fields(obj, prefix: str = "") -> None:
    """Every setting of `obj` against its type and rule; floats given as ints become floats. Nested sections
    (dataclass values) check themselves."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            continue
        rule = f.metadata.get("rule")
        if rule is None:
            raise TypeError(f"{type(obj).__name__}.{f.name} is declared without a rule; use rules.setting")
        kind, optional = kind_of(f)
        key = prefix + f.name
        if value is None:
            if optional:
                continue
            raise UserError(f"{key} must be set: {rule.describe()}")
        if not _is(kind, value):
            raise UserError(f"{key} must be {_TYPE_NAMES.get(kind, kind)}, not {shown(value)}")
        given = value
        if kind == "float" and not isinstance(value, float):
            value = float(value) if abs(value) < 2**1023 else math.inf  # float() of a larger int overflows
            setattr(obj, f.name, value)
        if not rule.ok(value):
            raise UserError(f"{key} must be {rule.describe()}, not {shown(given)}")


def shown(value: Any, limit: int = 60) -> str:
    """A value as a message shows it: one line, short (a huge int as its size: its digits would not even print)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a {value.bit_length()}-bit integer"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
