"""`qilin.json`, the file a run directory describes itself in, read with one clear line when it is damaged.

In:  the path of a `qilin.json` (written by align, tune, merge, convert, `assemble_base`).
Out: its object, checked: `kind`, `template` and `image_mode` are strings, `kind` one qilin-lite writes, `base` a
     string or null, `qilin_lite_version` a string, `base_identity` an object or null. Anything else (not JSON, not
     an object, a key missing or of the wrong type) is a UserError naming the file and the key: a hand-edited or
     half-copied file must not reach `load_run` as a KeyError or a traceback in chat, eval, merge or export.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

KINDS = ("base", "align", "lora", "qlora", "full", "merged", "converted")
REQUIRED = ("kind", "template", "image_mode")
OPTIONAL = {"base": (str, type(None)), "qilin_lite_version": (str,), "base_identity": (dict, type(None))}


def read_run_file(path: Path) -> dict:
    f = Path(path)
    fix = "restore it from where the run was written, or write the run again"
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{f}: not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{f}:{e.lineno}: not valid JSON ({e.msg}); {fix}") from None
    except RecursionError:
        raise UserError(f"{f}: JSON nested deeper than Python's parser allows; {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{f}: holds a JSON {type(data).__name__}, not an object with kind, template and "
                        f"image_mode; {fix}")
    for key in REQUIRED:
        if not isinstance(data.get(key), str) or not data[key]:
            got = "missing" if key not in data else f"{json.dumps(data[key])[:40]}, not a name"
            raise UserError(f"{f}: '{key}' is {got}; {fix}")
    if data["kind"] not in KINDS:
        raise UserError(f"{f}: kind {json.dumps(data['kind'])[:40]} is none qilin-lite writes "
                        f"({', '.join(KINDS)}); {fix}")
    for key, types in OPTIONAL.items():
        if key in data and not isinstance(data[key], types):
            raise UserError(f"{f}: '{key}' is {json.dumps(data[key])[:40]}, which is not a "
                            f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}; {fix}")
    return data
