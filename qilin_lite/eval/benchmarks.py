"""Published benchmark layouts -> EvalItems (`load_eval_items(path, task, image_folder)`).

Each layout, and how its question kind is decided, is specified in docs/eval.md. Image names are joined to
`image_folder` (default: the data file's folder). Ids must be unique within a file; they key resume and
`--predictions` matching. A malformed file or record raises UserError naming file, line or record, and the fix.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..conversation import IMAGE_TOKEN
from ..data.records import BadRecord, messages_from_llava
from ..data.rows import is_json_list, iter_json
from ..errors import UserError, where
from .items import DEFAULT_CAPTION_PROMPT, TASKS, EvalItem
from .metrics import LETTERS, normalize_text, reference_yes_no, strip_option_label

ID_KEYS = ("id", "qid", "question_id")
IMAGE_KEYS = ("image", "image_name", "img_name", "image_path", "Figure_path")
ANSWER_KEYS = ("prediction", "answer", "text", "response", "output")


def load_eval_items(path: str | Path, task: str, image_folder: str | Path | None = None) -> list[EvalItem]:
    """Read a benchmark file in its published layout (see the module docstring) into EvalItems."""
    path = Path(path)
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    if task in ("omnimedvqa", "mmmu") and path.is_dir():
        pass  # a folder of their files
    elif not path.is_file():
        raise UserError(f"{path}: no such data file; check --data")
    folder = Path(image_folder) if image_folder is not None else path.parent
    if task == "pmc-vqa":
        if path.suffix.lower() != ".csv":
            raise UserError(f"{path}: PMC-VQA is read from its CSV (test.csv or test_clean.csv); pass that file")
        items = _load_pmc_vqa(path, folder)
    elif task == "omnimedvqa":
        from .newer import load_omnimedvqa

        items = load_omnimedvqa(path, Path(image_folder) if image_folder is not None else None)
    elif task == "mmmu":
        from .newer import load_mmmu

        items = load_mmmu(path, Path.home() / ".cache" / "qilin-lite" / "mmmu-images")
    else:
        records = list(read_benchmark_records(path))
        if task == "vqa-rad" and any("phrase_type" in r for _, _, r in records if isinstance(r, dict)):
            records = [x for x in records if not isinstance(x[2], dict) or _is_vqa_rad_test(x[2])]
        items = [_record_item(rec, task, folder, path, line, i) for line, i, rec in records]
    if not items:
        raise UserError(f"{path}: no questions found; check --data and --task")
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.id in seen:
            raise UserError(
                f"{where(path, record_id=item.id)}: id used by records {seen[item.id]} and {i}; ids must be unique "
                "(they key resume and --predictions)"
            )
        seen[item.id] = i
    return items


def _is_vqa_rad_test(rec: dict) -> bool:
    return str(rec.get("phrase_type", "")).strip().lower().startswith("test")


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


def _text(value: Any, loc: str, what: str) -> str:
    """A required text field: strings and numbers (VQA-RAD has numeric answers) are fine, empty is not."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise UserError(f"{loc}: {what} is missing or empty; every record needs one")
    return str(value).strip()


def _conversation(turns: Any, loc: str) -> tuple[str, str]:
    """(first human turn without "<image>", first gpt turn after it), parsed as training parses turns."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise UserError(f"{loc}: conversations must be a list of {{from, value}} turns")
    try:
        messages = messages_from_llava(turns)
    except BadRecord as e:
        raise UserError(f"{loc}: {e}") from None
    human = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    gpt = None if human is None else next(
        (i for i in range(human + 1, len(messages)) if messages[i]["role"] == "assistant"), None
    )
    if gpt is None:
        raise UserError(f"{loc}: conversations need a human turn followed by a gpt turn (the reference answer)")
    question = _text(messages[human]["content"].replace(IMAGE_TOKEN, ""), loc, "the human turn")
    return question, _text(messages[gpt]["content"], loc, "the gpt turn (reference)")


def _record_item(rec: Any, task: str, folder: Path, path: Path, line: int | None, pos: int) -> EvalItem:
    rid = first_of(rec, ID_KEYS) if isinstance(rec, dict) else None
    loc = where(path, line, str(rid) if rid is not None else f"record {pos}")
    if not isinstance(rec, dict):
        raise UserError(f"{loc}: expected a JSON object, got {type(rec).__name__}")
    # the keys training reads (records.py), and LLaVA-Med's misspelt "conversatons"
    turns = rec.get("conversations", rec.get("messages", rec.get("conversatons")))
    if turns is not None:
        question, reference = _conversation(turns, loc)
    elif task == "caption":
        question = str(rec.get("question") or DEFAULT_CAPTION_PROMPT).replace(IMAGE_TOKEN, "").strip()
        reference = _text(first_of(rec, ("caption", "answer")), loc, "caption")
    else:
        question = _text(rec.get("question"), loc, "question")
        reference = _text(rec.get("answer"), loc, "answer")
    image = first_of(rec, IMAGE_KEYS)
    if task != "caption" or image is not None:
        image = str(folder / _text(image, loc, "image name (image / image_name / img_name)"))
    lang = first_of(rec, ("q_lang", "lang"))
    if lang is not None and not isinstance(lang, str):
        raise UserError(f"{loc}: q_lang must be a string such as \"en\" or \"zh\"")
    choices = None
    if task == "caption":
        kind = "caption"
    elif task == "llava" and rec.get("choices") is not None:
        kind, choices = "choice", _choices(rec["choices"], loc)
        answer = _text(rec["answer"], loc, "answer") if "answer" in rec else reference
        if answer not in choices:
            raise UserError(f"{loc}: answer {answer!r} is not one of its choices {choices}; fix answer or choices")
        reference = LETTERS[choices.index(answer)]
    else:
        kind = _vqa_kind(rec.get("answer_type"), reference, loc)
    return EvalItem(str(rid) if rid is not None else str(pos), image, question, reference, task, kind, choices, lang)


def _choices(value: Any, loc: str) -> list[str]:
    """A LLaVA-format record's `choices`: 2 to 8 distinct option texts."""
    if not isinstance(value, list) or not all(isinstance(c, str) and c.strip() for c in value):
        raise UserError(f"{loc}: choices must be a list of option texts, e.g. [\"左侧\", \"右侧\"]")
    choices = [c.strip() for c in value]
    if not 2 <= len(choices) <= len(LETTERS) or len(set(choices)) != len(choices):
        raise UserError(f"{loc}: choices {choices} must be 2 to {len(LETTERS)} distinct options")
    return choices


def _vqa_kind(answer_type: Any, reference: str, loc: str) -> str:
    if answer_type is None:
        return "closed" if reference_yes_no(reference) else "open"
    t = str(answer_type).strip().upper()
    if t not in ("CLOSED", "OPEN"):
        raise UserError(f"{loc}: answer_type {answer_type!r} is neither CLOSED nor OPEN; fix or drop the field")
    return t.lower()


def _load_pmc_vqa(path: Path, folder: Path) -> list[EvalItem]:
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
            image = str(folder / _text(row.get("Figure_path"), loc, "Figure_path"))
            question = _text(row.get("Question"), loc, "Question")
            items.append(EvalItem(rid, image, question, label, "pmc-vqa", "choice", choices, None))
    return items
