"""VQA-RAD, SLAKE and PathVQA (and captions, and questions in LLaVA's training format) -> EvalItems: JSON or JSONL
records, one question (or image to caption) each, read by one reader (records.py).

Each layout, and how a question's kind is decided, is specified in docs/eval.md. The prompt is format_prompt's
(prompt.py) and the scoring rule the item kind's (metrics.py, matching.py): these benchmarks have no rules of their
own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.records import BadRecord, messages_from_llava
from ..errors import UserError, where
from ..families import IMAGE_TOKEN
from .items import DEFAULT_CAPTION_PROMPT, EvalItem
from .matching import LETTERS, reference_yes_no
from .records import ID_KEYS, first_of, read_benchmark_records, required_text

IMAGE_KEYS = ("image", "image_name", "img_name", "image_path", "Figure_path")


def load_vqa_json(path: Path, task: str, folder: Path) -> list[EvalItem]:
    """The EvalItems of a JSON list or JSONL file; of VQA-RAD's full release (each question's split in
    `phrase_type`), its test questions."""
    records = list(read_benchmark_records(path))
    if task == "vqa-rad" and any("phrase_type" in r for _, _, r in records if isinstance(r, dict)):
        records = [x for x in records if not isinstance(x[2], dict) or _is_vqa_rad_test(x[2])]
    return [_record_item(rec, task, folder, path, line, i) for line, i, rec in records]


def _is_vqa_rad_test(rec: dict) -> bool:
    return str(rec.get("phrase_type", "")).strip().lower().startswith("test")


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
    question = required_text(messages[human]["content"].replace(IMAGE_TOKEN, ""), loc, "the human turn")
    return question, required_text(messages[gpt]["content"], loc, "the gpt turn (reference)")


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
        reference = required_text(first_of(rec, ("caption", "answer")), loc, "caption")
    else:
        question = required_text(rec.get("question"), loc, "question")
        reference = required_text(rec.get("answer"), loc, "answer")
    image = first_of(rec, IMAGE_KEYS)
    if task != "caption" or image is not None:
        image = str(folder / required_text(image, loc, "image name (image / image_name / img_name)"))
    lang = first_of(rec, ("q_lang", "lang"))
    if lang is not None and not isinstance(lang, str):
        raise UserError(f"{loc}: q_lang must be a string such as \"en\" or \"zh\"")
    choices = None
    if task == "caption":
        kind = "caption"
    elif task == "llava" and rec.get("choices") is not None:
        kind, choices = "choice", _choices(rec["choices"], loc)
        answer = required_text(rec["answer"], loc, "answer") if "answer" in rec else reference
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
