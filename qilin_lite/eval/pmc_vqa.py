"""PMC-VQA -> EvalItems: its CSV (test.csv or test_clean.csv), one multiple-choice question per row.

The layout is specified in docs/eval.md. The prompt is format_prompt's lettered options (prompt.py) and the rule
`extract_option` (matching.py).
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import UserError, where
from .items import EvalItem
from .matching import LETTERS, normalize_text, strip_option_label
from .records import required_text


def load_pmc_vqa(path: Path, folder: Path) -> list[EvalItem]:
    if path.suffix.lower() != ".csv":
        raise UserError(f"{path}: PMC-VQA is read from its CSV (test.csv or test_clean.csv); pass that file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        choice_cols = [f"Choice {x}" for x in LETTERS if f"Choice {x}" in columns]
        missing = [c for c in ("Figure_path", "Question", "Choice A", "Choice B") if c not in columns]
        if missing or ("Answer_label" not in columns and "Answer" not in columns):
            raise UserError(
                f"{path}: not a PMC-VQA CSV (missing column(s) {', '.join(missing) or 'Answer_label'}); expected "
                "Figure_path, Question, Choice A..D, Answer_label"
            )
        letters = LETTERS[: len(choice_cols)]
        items = []
        for pos, row in enumerate(reader):
            rid = (row.get("index") or "").strip() or str(pos)
            loc = where(path, reader.line_num, rid)
            choices = [strip_option_label(row.get(c) or "").strip() for c in choice_cols]
            while choices and not choices[-1]:  # a 3-option question leaves Choice D empty
                choices.pop()
            if len(choices) < 2 or not all(choices):
                raise UserError(f"{loc}: needs at least Choice A and Choice B filled in")
            label = (row.get("Answer_label") or "").strip().upper()
            if not label:  # fall back to the answer text
                answer = normalize_text(strip_option_label(row.get("Answer") or ""))
                hits = [letters[i] for i, c in enumerate(choices) if answer and normalize_text(c) == answer]
                label = hits[0] if len(hits) == 1 else ""
            if label not in letters[: len(choices)]:
                raise UserError(
                    f"{loc}: Answer_label {label!r} is not one of {', '.join(letters[: len(choices)])}; fix the row"
                )
            image = str(folder / required_text(row.get("Figure_path"), loc, "Figure_path"))
            question = required_text(row.get("Question"), loc, "Question")
            items.append(EvalItem(rid, image, question, label, "pmc-vqa", "choice", choices, None))
    return items
