"""OmniMedVQA, one of the benchmarks newer medical VLM papers report beside the classic four: read, prompt, score.

Multiple choice, read in its published layout, shown to the model in its authors' prompt and scored by its authors'
rule (reimplemented here; the files matched against are named in docs/eval.md and each function).

Layout: `QA_information/Open-access/*.json`, one JSON list per source dataset (pass one file or the folder):
`{question_id, question_type, question, gt_answer, image_path, option_A, option_B[, option_C, option_D],
modality_type, dataset}`; `image_path` is relative to the OmniMedVQA root (found above `QA_information/`).
Prompt and rule from OpenGVLab/Multi-Modality-Arena `MedicalEval/Question-answering_Score`
(`task_datasets/medical_datasets.py`, `utils/medicalqa.py`): the options are listed as a Python list after the
question, and the answer is the option most similar to the model's text by `difflib.SequenceMatcher.ratio` (the
first of equals; no similarity at all is wrong).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from ..errors import UserError, where
from .items import EvalItem
from .matching import LETTERS, as_text


def omnimedvqa_prompt(question: str, options: list[str]) -> str:
    return (question + f"Here are {len(options)} candidate answers:" + str(options) +
            " Only return what you think is the correct answer from the candidate answers, do not return any other "
            "irrelevant text!")


def omnimedvqa_choice(prediction, options: list[str]) -> str | None:
    """The letter of the option most similar to the answer (strictly greater wins: the first of equals)."""
    text, best, index = as_text(prediction), 0.0, None
    for i, option in enumerate(options):
        ratio = difflib.SequenceMatcher(None, option, text).ratio()
        if ratio > best:
            best, index = ratio, i
    return None if index is None else LETTERS[index]


def load_omnimedvqa(path: Path, image_folder: Path | None) -> list[EvalItem]:
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{path}: no .json files; pass QA_information/Open-access or one of its files")
    root = image_folder or next((p.parent for p in path.resolve().parents if p.name == "QA_information"), None)
    root = root or (path if path.is_dir() else path.parent)
    items = []
    for f in files:
        try:
            rows = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{where(f, e.lineno)}: not valid JSON ({e.msg}); re-download the file") from None
        if not isinstance(rows, list):
            raise UserError(f"{f}: expected a JSON list of questions (OmniMedVQA's layout)")
        for n, r in enumerate(rows):
            loc = where(f, record_id=str(r.get("question_id", n)) if isinstance(r, dict) else str(n))
            if not isinstance(r, dict) or not all(k in r for k in ("question", "gt_answer", "image_path", "option_A")):
                raise UserError(f"{loc}: needs question, gt_answer, image_path and option_A.. (OmniMedVQA's layout)")
            options = [str(r[k]) for k in ("option_A", "option_B", "option_C", "option_D") if r.get(k) is not None]
            if str(r["gt_answer"]) not in options:
                raise UserError(f"{loc}: gt_answer {r['gt_answer']!r} is none of the options")
            items.append(EvalItem(str(r.get("question_id", f"{f.stem}-{n}")), str(root / r["image_path"]),
                                  str(r["question"]), LETTERS[options.index(str(r["gt_answer"]))], "omnimedvqa",
                                  "choice", options))
    return items
