"""Source files and their layouts for `data build`: rows read streamed (JSONL, JSON list, CSV/TSV, Parquet), and
which fields of a row hold the id, image, text, question, answer and choices (detected, or named with options).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import UserError
from .records import iter_jsonl

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


def iter_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (line or position, row, parse error) without loading the file: JSONL, JSON list, CSV/TSV, Parquet."""
    if not path.is_file():
        raise UserError(f"{path}: input file not found; check the path")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        yield from _iter_csv(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        with path.open("rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        yield from _iter_json_list(path) if head.startswith(b"[") else iter_jsonl(path)


def _iter_json_list(path: Path, chunk: int = 1 << 20):
    """Elements of a top-level JSON list, decoded one at a time from a sliding buffer (1-based positions)."""
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        buf, pos, eof = "", 0, False

        def more() -> bool:
            nonlocal buf, pos, eof
            data = f.read(chunk)
            eof = not data
            buf, pos = buf[pos:] + data, 0
            return bool(data)

        def skip_space() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not more():
                    return buf[pos] if pos < len(buf) else ""

        more()
        if skip_space() != "[":
            yield 1, None, "not a JSON list"
            return
        pos += 1
        n = 0
        while True:
            c = skip_space()
            if c == "]":
                return
            if n:
                if c != ",":
                    yield n + 1, None, "not valid JSON (expected ',' between records)"
                    return
                pos += 1
                skip_space()
            while True:
                try:
                    row, end = decoder.raw_decode(buf, pos)
                    if end == len(buf) and not eof:
                        raise json.JSONDecodeError("incomplete", buf, end)  # the value may go on in the next chunk
                    break
                except json.JSONDecodeError as e:
                    if not more():
                        # a JSON list cannot be resynchronised after a broken element: say that reading stopped
                        yield n + 1, None, (f"not valid JSON ({e.msg}); the records after it were not read: "
                                            "fix it or use JSONL")
                        return
            n += 1
            pos = end
            yield n, row, None if isinstance(row, dict) else "record is not a JSON object"


def _iter_csv(path: Path, delimiter: str):
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            yield reader.line_num, {k: v for k, v in row.items() if k is not None}, None


def _iter_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs `pip install pyarrow`, or convert it to JSONL") from None
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield n, row, None
