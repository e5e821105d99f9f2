"""JSON and JSONL record files as eval reads them: benchmark files in LLaVA's family of layouts (vqa_json.py) and
answers made elsewhere (`eval run --predictions`, run.py).

`read_benchmark_records` is the one reader (data/rows.py underneath); `first_of` picks a field by its usual names
(`ID_KEYS`, `ANSWER_KEYS`); `required_text` reads a field every record must fill in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..data.rows import is_json_list, iter_json
from ..errors import UserError, where

ID_KEYS = ("id", "qid", "question_id")
ANSWER_KEYS = ("prediction", "answer", "text", "response", "output")


def read_benchmark_records(path: Path) -> Iterable[tuple[int | None, int, Any]]:
    """(line or None, position, record) from a JSON list or a JSONL file, read by the one row reader (data/rows.py);
    a line that is not JSON, or a broken list, is a UserError naming the line."""
    lines = not is_json_list(path)
    if lines and path.suffix.lower() != ".jsonl":
        try:  # one pretty-printed object reads as broken JSONL: say what it is instead
            whole = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            whole = None
        if isinstance(whole, dict):
            raise UserError(f"{path}: expected a JSON list of records (or JSONL), got a single object")
    for pos, (n, rec, error) in enumerate(iter_json(path, on_broken="raise")):
        if rec is None:
            raise UserError(f"{where(path, n)}: {error}; fix or delete the line")
        yield (n if lines else None), pos, rec


def first_of(rec: dict, keys: Sequence[str]) -> Any:
    for k in keys:
        if k in rec and rec[k] is not None:
            return rec[k]
    return None


def required_text(value: Any, loc: str, what: str) -> str:
    """A required text field: strings and numbers (VQA-RAD has numeric answers) are fine, empty is not."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise UserError(f"{loc}: {what} is missing or empty; every record needs one")
    return str(value).strip()

