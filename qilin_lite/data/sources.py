"""Source layouts for `data build`: which fields of a row (read by rows.py) hold the id, image, text, question,
answer and choices, detected or named with options.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

log = logging.getLogger(__name__)

FIELD_NAMES = ("id", "image", "text", "question", "answer", "choices")


@dataclass
class FieldMap:
    """Which input field holds what; None = look it up by the layout's usual names. `choices` may name one list
    field or several fields (PMC-VQA's `Choice A`..`Choice D`)."""

    id: str | None = None
    image: str | None = None
    text: str | None = None
    question: str | None = None
    answer: str | None = None
    choices: list[str] | None = None


# layout -> (display name used as `source`, field -> candidate names). Matching ignores case.
LAYOUTS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "pmc-oa": ("PMC-OA", {"id": ("id",), "image": ("image",), "text": ("caption",)}),
    "pmc-casereport": ("PMC-CaseReport", {
        "id": ("id",), "image": ("img_ref",), "text": ("context",), "question": ("question",), "answer": ("answer",),
    }),
    "pmc-vqa": ("PMC-VQA", {
        "id": ("id",), "image": ("Figure_path",), "question": ("Question",), "answer": ("Answer", "Anwser"),
        "choices": ("Choice A", "Choice B", "Choice C", "Choice D"),
    }),
    "fields": ("", {
        "id": ("id", "question_id", "qid"),
        "image": ("image", "images", "img_ref", "figure_path", "image_path", "img", "file_name"),
        "text": ("caption", "text", "context", "inline", "description"),
        "question": ("question", "query"), "answer": ("answer", "anwser", "response"),
        "choices": ("choices", "options"),
    }),
}


@dataclass
class Layout:
    name: str  # llava | pmc-oa | pmc-casereport | pmc-vqa | fields
    source: str  # written as each record's `source`
    task: str  # dialog (llava passes through) | caption | context | vqa
    keys: dict[str, Any]  # field -> actual key in the rows (choices: list of keys)


def detect_layout(row: dict, name: str, fields: FieldMap, task: str, text_kind: str | None, path: Path) -> Layout:
    """Pick the layout from the first row's keys (or `name`), resolve field names, and choose the task."""
    keys = {k.lower(): k for k in row}
    if name == "auto":
        if "conversations" in keys or "messages" in keys:
            name = "llava"
        elif "figure_path" in keys:
            name = "pmc-vqa"
        elif "img_ref" in keys:
            name = "pmc-casereport"
        elif "image" in keys and "caption" in keys:
            name = "pmc-oa"
        else:
            name = "fields"
    if name == "llava":
        return Layout("llava", "", "dialog", {"id": fields.id or keys.get("id", "id")})
    if name not in LAYOUTS:
        raise UserError(f"unknown --layout '{name}'; choose auto, llava, {', '.join(LAYOUTS)}")
    display, candidates = LAYOUTS[name]

    def find(f: str):
        given = getattr(fields, f)
        if f == "choices":
            names = given or [c for c in candidates.get(f, ()) if c.lower() in keys]
            if given and any(c.lower() not in keys for c in given):
                raise UserError(f"{path}: --choices-field names {given}, but the rows have {sorted(row)}")
            return [keys[c.lower()] for c in names] or None
        if given is not None:
            if given.lower() not in keys:
                raise UserError(f"{path}: --{f}-field '{given}' is not a field of the rows (fields: {sorted(row)})")
            return keys[given.lower()]
        return next((keys[c.lower()] for c in candidates.get(f, ()) if c.lower() in keys), None)

    k = {f: find(f) for f in FIELD_NAMES}
    has_text, has_qa = k["text"] is not None, k["question"] is not None and k["answer"] is not None
    if task == "auto":
        if has_text and has_qa:
            raise UserError(
                f"{path}: rows hold both a text ('{k['text']}') and question/answer fields; pass --task align "
                "(text -> stage-1 pairs) or --task instruct (question/answer -> stage-2 dialogs)"
            )
        task = "align" if has_text else "instruct" if has_qa else ""
    need = {"align": ("text",), "instruct": ("question", "answer")}.get(task)
    if need is None or any(k[f] is None for f in need) or k["image"] is None:
        raise UserError(
            f"{path}: cannot tell which fields to use (fields: {sorted(row)}); name them with --image-field and "
            "--text-field (captions) or --question-field/--answer-field (VQA), and --task align|instruct"
        )
    if task == "instruct":
        out_task = "vqa"
    else:
        out_task = text_kind or ("context" if k["text"].lower() == "context" else "caption")
    return Layout(name, display, out_task, k)
