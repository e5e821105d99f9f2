"""MMMU's Health & Medicine subjects, beside OmniMedVQA what newer medical VLM papers report: read, prompt, score.

Read in its published layout, shown to the model in its authors' prompt and scored by its authors' rule
(reimplemented here; the files matched against are named in docs/eval.md and each function).

Layout: the MMMU dataset's parquet files, `<Subject>/validation-*.parquet` (pass one file or the root folder, whose
Health & Medicine subjects are read): `{id, question, options (a Python list as text), answer, image_1..image_7
({bytes, path}), question_type, subfield}`. Prompt from MMMU's LLaVA-1.5 setting (`multi_choice_example_format`:
question, `(A) option` lines, "Answer with the option's letter from the given choices directly."); rule from
MMMU-Benchmark/MMMU `eval/eval_utils.py` `parse_multi_choice_response`: "(A)", then " A ", then (answers over 5
words) the option's text, the last one mentioned winning; nothing found is a random letter, as theirs, but seeded
per question (theirs draws from one sequence seeded 42, so it depends on the order). The question's images,
interleaved as `<image k>`, are joined into one composite in order of mention (this toolkit's models take one
image); the `<image k>` text stays. Open questions (a few in these subjects) are items of kind "short", asked with
MMMU's `short_ans_example_format` and scored by its `parse_open_response` + `eval_open` (numbers compared as floats
rounded to 2 places, text by containment of the normalized answer).
"""

from __future__ import annotations

import ast
import hashlib
import logging
import random
import re
from pathlib import Path

from ..errors import UserError, where
from ..files import save_image_atomic
from .items import EvalItem
from .matching import LETTERS, as_text

log = logging.getLogger(__name__)

MMMU_HEALTH = ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy",
               "Public_Health")
MMMU_INSTRUCTION = "Answer with the option's letter from the given choices directly."
MMMU_SHORT = "Answer the question using a single word or phrase."


# ---------------------------------------------------------------- prompts


def mmmu_prompt(question: str, options: list[str]) -> str:
    listed = "".join(f"({LETTERS[i]}) {o}\n" for i, o in enumerate(options))
    return f"{question}\n{listed}\n{MMMU_INSTRUCTION}"


def mmmu_short_prompt(question: str) -> str:
    return f"{question}\n{MMMU_SHORT}"


# ---------------------------------------------------------------- scoring


def mmmu_choice(prediction, options: list[str], qid: str) -> str:
    """MMMU's parse_multi_choice_response, with its random fallback seeded by the question's id."""
    response = as_text(prediction)
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = f" {response} "
    letters = list(LETTERS[: len(options)])
    found = [c for c in letters if f"({c})" in response]
    bracketed, by_text = bool(found), False
    if not found:
        found = [c for c in letters if f" {c} " in response]
    if not found and len(response.split()) > 5:
        found = [c for c, o in zip(letters, options) if o.lower() in response.lower()]
        by_text = bool(found)
    if not found:
        return random.Random(f"mmmu:{qid}").choice(letters)
    if len(found) == 1:
        return found[0]
    if by_text:
        where_ = [response.lower().rfind(options[letters.index(c)].lower()) for c in found]
    else:
        where_ = [response.rfind(f"({c})" if bracketed else f" {c} ") for c in found]
    return found[where_.index(max(where_))]


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def _normalized(text: str) -> list:
    """MMMU's normalize_str: a number -> [float rounded to 2]; one character -> padded forms; else lower case."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


_NUMBERS = (r"-?\b\d{1,3}(?:,\d{3})+\b", r"-?\d+(?:\.\d+)?[eE][+-]?\d+", r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
_KEYS = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]


def _open_candidates(response: str) -> list:
    """MMMU's parse_open_response: the tail after a key phrase in each sentence (or the whole answer), plus the
    numbers in them, normalized."""
    response = response.strip().strip(".").lower()
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    tails = []
    for i, part in enumerate(parts):
        keys = _KEYS + (["="] if i == len(parts) - 1 else [])
        found = [part.split(k)[-1].strip() for k in keys if k in part]
        shortest = min(found, key=len) if found else ""  # the first of the shortest, as theirs keeps the first
        if shortest:  # an empty tail ("... answer is") counts as none, as theirs
            if shortest.strip() not in [":", ",", ".", "!", "?", ";", "'"]:
                tails.append(shortest)
    tails = tails or [response]
    preds = list(tails)
    for t in tails:
        for pattern in _NUMBERS:
            preds.extend(re.findall(pattern, t))
    out = []
    for p in preds:
        out.extend(_normalized(p))
    return list(dict.fromkeys(out))


def mmmu_short_correct(prediction, reference) -> bool:
    """MMMU's eval_open: a text reference inside a text candidate, or a number equal to a number candidate."""
    if isinstance(reference, str) and reference.startswith("["):  # several accepted answers, as MMMU writes them
        try:
            reference = [str(r) for r in ast.literal_eval(reference)]
        except (ValueError, SyntaxError):
            pass
    refs = []
    for r in reference if isinstance(reference, list) else [reference]:
        refs.extend(_normalized(str(r)))
    for cand in _open_candidates(as_text(prediction)):
        if isinstance(cand, str):
            if any(isinstance(r, str) and r in cand for r in refs):
                return True
        elif cand in refs:
            return True
    return False


# ---------------------------------------------------------------- reader


def load_mmmu(path: Path, cache: Path) -> list[EvalItem]:
    import pandas as pd

    if path.is_dir():
        files = [f for s in MMMU_HEALTH for f in sorted((path / s).glob("*.parquet"))]
        files = files or sorted(path.glob("*.parquet"))
    else:
        files = [path]
    if not files:
        raise UserError(f"{path}: no parquet files; pass MMMU's folder (its Health & Medicine subjects are read) "
                        "or one subject's parquet file")
    items, skipped = [], 0
    for f in files:
        try:
            frame = pd.read_parquet(f)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise UserError(f"{f}: cannot read it as parquet ({type(e).__name__}); re-download it") from None
        for row in frame.to_dict("records"):
            qid = str(row.get("id"))
            if row.get("question_type") != "multiple-choice":
                answer = _open_answer(row.get("answer"))
                if answer is None:
                    skipped += 1
                    continue
                image, parts = _mmmu_image(row, qid, cache)
                items.append(EvalItem(qid, image, str(row["question"]), answer, "mmmu", "short", parts=parts))
                continue
            try:
                options = [str(o) for o in ast.literal_eval(str(row["options"]))]
            except (ValueError, SyntaxError, KeyError):
                raise UserError(f"{where(f, record_id=qid)}: options are not a list; re-download the file") from None
            answer = str(row.get("answer", "")).strip()
            if answer not in LETTERS[: len(options)]:
                raise UserError(f"{where(f, record_id=qid)}: answer {answer!r} is not an option letter")
            image, parts = _mmmu_image(row, qid, cache)
            items.append(EvalItem(qid, image, str(row["question"]), answer, "mmmu", "choice", options, parts=parts))
    if skipped:
        log.warning("%s: %d open questions without an answer skipped", path, skipped)
    return items


def _open_answer(value) -> str | None:
    """An open question's answer; MMMU writes several accepted answers as a Python list in text ("['1', '1.0']"),
    kept as that text and read back as a list when scored."""
    text = str(value).strip() if value is not None else ""
    return text or None


def _mmmu_image(row: dict, qid: str, cache: Path) -> tuple[str | None, tuple[str, ...]]:
    """The question's images (in order of mention, else image_1) as one PNG in `cache` (their composite), and, when
    there are several, each as its own PNG (for templates that show images separately); written once."""
    from io import BytesIO

    from PIL import Image

    from ..images.decode import composite

    mentioned = [int(k) for k in re.findall(r"<image (\d+)>", str(row.get("question", "")))]
    order = list(dict.fromkeys(mentioned)) or [1]
    blobs = [row.get(f"image_{k}") for k in order]
    blobs = [b["bytes"] for b in blobs if isinstance(b, dict) and b.get("bytes")]
    if not blobs:
        return None, ()
    digest = hashlib.sha256(b"".join(blobs)).hexdigest()[:20]
    out = cache / f"{digest}.png"
    parts = [cache / f"{hashlib.sha256(b).hexdigest()[:20]}.png" for b in blobs] if len(blobs) > 1 else []
    if not out.exists() or not all(p.exists() for p in parts):
        cache.mkdir(parents=True, exist_ok=True)
        images = [Image.open(BytesIO(b)).convert("RGB") for b in blobs]
        for img, p in zip(images, parts):
            save_image_atomic(img, p)
        save_image_atomic(images[0] if len(images) == 1 else composite(images[:4]), out)
    return str(out), tuple(str(p) for p in parts)
