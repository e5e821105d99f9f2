"""`qilin-lite eval`: benchmark file -> EvalItems -> predictions.jsonl -> metrics + report.

The model is injected: `run_eval(items, generate, out_dir)` calls `generate(batch of EvalItems) -> list[str]`
(`format_prompt(item)` is the text to show the model). `model_generate(model_dir)` is that callable for a
qilin-lite model (greedy, via `generate.generator_for`); tests pass fakes. Scoring rules live in `metrics.py`.
`register(app)` adds `qilin-lite eval [run] ...` and `qilin-lite eval compare ...` (see docs/eval.md);
`score_demo_heldout` is the demo's held-out accuracy, computed by this same code.

Layouts read by `load_eval_items(path, task, image_folder)`; image names are joined to `image_folder` (default:
the data file's folder). Ids must be unique within a file; they key resume and `--predictions` matching.
- pmc-vqa: the PMC-VQA CSV (test.csv / test_clean.csv). Columns Figure_path, Question, Choice A .. Choice D
  (values like "A:Pneumonia"; the "A:" label is dropped), Answer_label (A-D; when empty, the Answer text is matched
  against the choices). Optional Answer. id = the `index` column when present, else the 0-based data row number.
- vqa-rad: the VQA-RAD JSON ("VQA_RAD Dataset Public.json"): a list of {qid, image_name, question, answer,
  answer_type: CLOSED|OPEN, ...}. The public file holds train and test together; when records carry
  `phrase_type`, only test_freeform / test_para questions are kept (the 451-question test split papers report).
- slake: SLAKE's test.json: a list of {qid, img_name, question, answer, answer_type, q_lang: en|zh, ...}; metrics
  are reported overall and per q_lang.
- pathvqa: LLaVA-Med's converted test.json in the LLaVA conversation format (below) with an answer_type field, or a
  plain list of {image, question, answer[, answer_type][, id]}.
- any task, LLaVA conversation format (.json list or .jsonl): {id, image, conversations: [{from: human, value:
  "<image>\\nQ"}, {from: gpt, value: A}], [answer_type], [lang]}: question = first human turn minus "<image>",
  reference = the first gpt turn after it. LLaVA-Med's misspelt "conversatons" key is accepted.
- caption: the conversation format, or a list of {image, caption (or answer)[, question][, id]}.
- llava: any file in the conversation format (or a plain {image, question, answer} list). A record with `choices`
  (a list of option texts) and `answer` (one of them; default: the gpt turn) is a choice item: the answer must name
  the reference option and no other (the demo's held-out.json). Its human turn is shown verbatim: no lettered
  options are added, since the record's prompt is the one its model was trained on.
For the VQA tasks, answer_type CLOSED/OPEN picks the kind; without one, an answer that is a yes/no form (yes, no,
是, 否, 有, 没有, ...) is closed and anything else open (PathVQA's convention). Records without an id get their
0-based position. A malformed file or record raises UserError naming file, line or record, and the fix.

Output directory (`run_eval`):
- predictions.jsonl: one JSON object per line, appended and flushed after every batch: id, task, kind, lang, image,
  question, choices, reference, prediction, extracted (option letter / "yes"|"no" / null), correct (bool, or the
  float score of an open question (token recall) or caption (ROUGE-L)), correct_llavamed (closed questions).
- metrics.json: `metrics.aggregate` over the predictions file's lines for the current items, so a resumed run
  writes exactly what an uninterrupted one does. Nothing run-dependent (no time, no paths) goes in it.
- report.md: the metrics as a Markdown table, one column per group (all / en / zh).
Resume: a rerun into the same directory skips ids already in predictions.jsonl; a torn last line (no newline,
not JSON: a crash mid-write) is cut off and its item generated again. `predictions_file=` (`--predictions`)
scores answers produced elsewhere (JSONL or a JSON list; id / question_id / qid, and prediction / answer / text /
response / output) and rewrites predictions.jsonl from them.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Optional, Sequence

import typer
from typer.core import TyperGroup

from qilin_lite.conversation import IMAGE_TOKEN, get_template
from qilin_lite.errors import UserError, where
from qilin_lite.metrics import (
    LETTERS,
    METRIC_LABELS,
    aggregate,
    as_text,
    normalize_text,
    reference_yes_no,
    score_item,
    strip_option_label,
)

TASKS = ("pmc-vqa", "vqa-rad", "slake", "pathvqa", "caption", "llava")
KINDS = ("closed", "open", "choice", "caption")
PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
REPORT = "report.md"
DEFAULT_CAPTION_PROMPT = "请描述这张图片。"

_ID_KEYS = ("id", "qid", "question_id")
_IMAGE_KEYS = ("image", "image_name", "img_name", "image_path", "Figure_path")
_ANSWER_KEYS = ("prediction", "answer", "text", "response", "output")


@dataclass
class EvalItem:
    """One benchmark question (or image to caption), whatever layout it came from."""

    id: str
    image: str | None
    question: str
    reference: str  # the answer text; for kind "choice" the option letter
    task: str
    kind: str  # "closed" | "open" | "choice" | "caption"
    choices: list[str] | None = None  # option texts, in letter order (choice only)
    lang: str | None = None  # "en" / "zh" where the benchmark says (SLAKE)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "choice" and (not self.choices or self.reference not in LETTERS[: len(self.choices)]):
            raise ValueError(f"choice item {self.id} needs choices and a reference letter among them")


def format_prompt(item: EvalItem) -> str:
    """The text to show the model: the question, plus lettered options and how to answer for multiple choice.

    LLaVA-format items (task "llava") are shown as written: their prompt is the one the model was trained on.
    """
    if item.kind != "choice" or item.task == "llava":
        return item.question
    lines = [item.question] + [f"{letter}. {c}" for letter, c in zip(LETTERS, item.choices)]
    zh = re.search(r"[\u4e00-\u9fff]", item.question + "".join(item.choices))
    lines.append("请直接回答选项字母。" if zh else "Answer with the option's letter from the given choices directly.")
    return "\n".join(lines)


# ---------------------------------------------------------------- loading


def load_eval_items(path: str | Path, task: str, image_folder: str | Path | None = None) -> list[EvalItem]:
    """Read a benchmark file in its published layout (see the module docstring) into EvalItems."""
    path = Path(path)
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    if not path.is_file():
        raise UserError(f"{path}: no such data file; check --data")
    folder = Path(image_folder) if image_folder is not None else path.parent
    if task == "pmc-vqa":
        if path.suffix.lower() != ".csv":
            raise UserError(f"{path}: PMC-VQA is read from its CSV (test.csv or test_clean.csv); pass that file")
        items = _load_pmc_vqa(path, folder)
    else:
        records = list(_read_records(path))
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


def _read_records(path: Path) -> Iterable[tuple[int | None, int, Any]]:
    """(line or None, position, record) from a JSON list or a JSONL file."""
    text = path.read_text(encoding="utf-8-sig")
    head = text.lstrip()[:1]
    if path.suffix.lower() != ".jsonl" and head == "{":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # not one object: read it as JSONL below
        if isinstance(whole, dict):
            raise UserError(f"{path}: expected a JSON list of records (or JSONL), got a single object")
    if path.suffix.lower() == ".jsonl" or head != "[":
        pos = 0
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield n, pos, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where(path, n)}: not valid JSON ({e.msg}); fix or delete the line") from None
            pos += 1
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where(path, e.lineno)}: not valid JSON ({e.msg}); fix the file") from None
    for i, rec in enumerate(data):
        yield None, i, rec


def _first(rec: dict, keys: Sequence[str]) -> Any:
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
    """(first human turn without "<image>", first gpt turn after it)."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise UserError(f"{loc}: conversations must be a list of {{from, value}} turns")
    human = next((i for i, t in enumerate(turns) if t.get("from") in ("human", "user")), None)
    gpt = None if human is None else next(
        (i for i in range(human + 1, len(turns)) if turns[i].get("from") in ("gpt", "assistant")), None
    )
    if gpt is None:
        raise UserError(f"{loc}: conversations need a human turn followed by a gpt turn (the reference answer)")
    question = _text(str(turns[human].get("value", "")).replace("<image>", ""), loc, "the human turn")
    return question, _text(turns[gpt].get("value"), loc, "the gpt turn (reference)")


def _record_item(rec: Any, task: str, folder: Path, path: Path, line: int | None, pos: int) -> EvalItem:
    rid = _first(rec, _ID_KEYS) if isinstance(rec, dict) else None
    loc = where(path, line, str(rid) if rid is not None else f"record {pos}")
    if not isinstance(rec, dict):
        raise UserError(f"{loc}: expected a JSON object, got {type(rec).__name__}")
    turns = rec.get("conversations", rec.get("conversatons"))
    if turns is not None:
        question, reference = _conversation(turns, loc)
    elif task == "caption":
        question = str(rec.get("question") or DEFAULT_CAPTION_PROMPT).replace("<image>", "").strip()
        reference = _text(_first(rec, ("caption", "answer")), loc, "caption")
    else:
        question = _text(rec.get("question"), loc, "question")
        reference = _text(rec.get("answer"), loc, "answer")
    image = _first(rec, _IMAGE_KEYS)
    if task != "caption" or image is not None:
        image = str(folder / _text(image, loc, "image name (image / image_name / img_name)"))
    lang = _first(rec, ("q_lang", "lang"))
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


# ---------------------------------------------------------------- running and scoring


def run_eval(
    items: Sequence[EvalItem],
    generate: Callable[[list[EvalItem]], list[str]] | None,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    predictions_file: str | Path | None = None,
) -> dict:
    """Answer (or take answers for) each item, append them to OUT/predictions.jsonl, then write metrics and report.

    With `generate`, a rerun into the same `out_dir` resumes: ids already in predictions.jsonl are not generated
    again. With `predictions_file`, answers come from that file (matched by id) and no model runs.
    """
    if (generate is None) == (predictions_file is None):
        raise UserError("give either a model (--model) or answers made elsewhere (--predictions FILE), not both")
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        items = list(items[:limit])
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if not items:
        raise UserError("no items to evaluate; check --data")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / PREDICTIONS
    by_id = {it.id: it for it in items}

    if predictions_file is not None:
        answers = _read_external(Path(predictions_file), items)
        with open(pred_path, "w", encoding="utf-8") as f:
            f.write("".join(_prediction_line(it, answers[it.id]) for it in items))
    else:
        done = _resume(pred_path, by_id)
        todo = [it for it in items if it.id not in done]
        _check_images(todo)
        with open(pred_path, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                answers = list(generate(batch))
                if len(answers) != len(batch):
                    raise ValueError(f"generate returned {len(answers)} answers for a batch of {len(batch)}")
                f.write("".join(_prediction_line(it, a) for it, a in zip(batch, answers)))
                f.flush()
                os.fsync(f.fileno())  # what is on disk is what a rerun resumes from

    written = {rec["id"]: rec for _, rec in _scan(pred_path)[0]}
    metrics = aggregate(items, [written[it.id]["prediction"] for it in items])
    (out / METRICS).write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out / REPORT).write_text(render_report(metrics), encoding="utf-8")
    return metrics


def _prediction_line(item: EvalItem, prediction: Any) -> str:
    text = as_text(prediction)
    rec = {
        "id": item.id,
        "task": item.task,
        "kind": item.kind,
        "lang": item.lang,
        "image": item.image,
        "question": item.question,
        "choices": item.choices,
        "reference": item.reference,
        "prediction": text,
        **score_item(item, text),
    }
    return json.dumps(rec, ensure_ascii=False) + "\n"


def _scan(path: Path) -> tuple[list[tuple[int, dict]], int]:
    """(line, record) for each good line of a predictions.jsonl, and the byte offset where good lines end.

    Only the last line may be torn (a crash mid-write): without a newline and not JSON, it is left out. Any other
    bad line is a UserError.
    """
    data = path.read_bytes()
    out, offset = [], 0
    chunks = data.split(b"\n")
    for n, raw in enumerate(chunks, start=1):
        last = n == len(chunks)  # the text after the final newline; b"" when the file ends cleanly
        if not raw.strip():
            offset += len(raw) + (0 if last else 1)
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not isinstance(rec, dict) or "id" not in rec or "prediction" not in rec:
                raise ValueError("needs id and prediction")
        except (ValueError, UnicodeDecodeError) as e:
            if last:
                break
            raise UserError(
                f"{where(path, n)}: not a predictions line ({e}); delete the line or use a new --out"
            ) from None
        out.append((n, rec))
        offset += len(raw) + (0 if last else 1)
    return out, offset


def _resume(pred_path: Path, by_id: dict[str, EvalItem]) -> set[str]:
    """Ids already answered in `pred_path`; cuts off a torn last line so appending starts on a fresh line."""
    if not pred_path.exists():
        return set()
    lines, good_end = _scan(pred_path)
    with open(pred_path, "r+b") as f:
        f.truncate(good_end)
        if good_end:  # a last line that parsed but lost its newline gets one back
            f.seek(good_end - 1)
            ends_clean = f.read(1) == b"\n"
            f.seek(good_end)
            if not ends_clean:
                f.write(b"\n")
    done = set()
    for n, rec in lines:
        item = by_id.get(str(rec["id"]))
        if item is None:
            continue  # e.g. an earlier run with a larger --limit
        if rec.get("task") != item.task or rec.get("reference") != item.reference:
            raise UserError(
                f"{where(pred_path, n, item.id)}: written for other data (task {rec.get('task')!r}, reference "
                f"{rec.get('reference')!r}); use a new --out for this run"
            )
        done.add(item.id)
    return done


def _check_images(items: Iterable[EvalItem]) -> None:
    """Fail before generating anything rather than after hours of it."""
    for it in items:
        if it.image is not None and not Path(it.image).is_file():
            raise UserError(f"{where(it.image, record_id=it.id)}: image not found; check --image-folder")


def _read_external(path: Path, items: Sequence[EvalItem]) -> dict[str, str]:
    """id -> answer text from a file of answers produced elsewhere."""
    if not path.is_file():
        raise UserError(f"{path}: no such predictions file; check --predictions")
    answers: dict[str, str] = {}
    for line, pos, rec in _read_records(path):
        loc = where(path, line, f"record {pos}" if line is None else None)
        if not isinstance(rec, dict):
            raise UserError(f"{loc}: expected a JSON object with an id and a prediction")
        rid = _first(rec, _ID_KEYS)
        key = next((k for k in _ANSWER_KEYS if k in rec), None)
        if rid is None or key is None:
            raise UserError(
                f"{loc}: needs an id ({' / '.join(_ID_KEYS)}) and an answer ({' / '.join(_ANSWER_KEYS)})"
            )
        answers[str(rid)] = as_text(rec[key])
    missing = [it.id for it in items if it.id not in answers]
    if missing:
        raise UserError(
            f"{path}: no prediction for {len(missing)} of {len(items)} questions (first id {missing[0]}); every "
            "question scored needs a line with its id (use --limit to score the first N only)"
        )
    return answers


# ---------------------------------------------------------------- reports


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key == "n" or key.startswith("n_"):
        return str(int(value))
    return f"{100 * value:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_report(metrics: dict) -> str:
    """metrics.json as Markdown: one row per metric, one column per group (all, then each language)."""
    groups = metrics["groups"]
    keys = [k for k in METRIC_LABELS if any(k in g for g in groups.values())]
    rows = [[METRIC_LABELS[k]] + [_fmt(k, g.get(k)) for g in groups.values()] for k in keys]
    notes = ["Scores in %; counts as numbers. Chinese text is tokenized by character, English by word."]
    if "accuracy" in keys:
        notes.append("Multiple choice: the option letter found in the answer must equal the label; none found: wrong.")
    if "closed_strict" in keys:
        notes.append(
            "Closed, LLaVA-Med rule: the normalized answer contains yes/no and contains the reference (comparable "
            "with published LLaVA-Med numbers); strict: the first yes/no word equals the reference."
        )
    if "open_recall" in keys:
        notes.append("Open recall: share of the reference's tokens found in the answer.")
    if "rougeL" in keys:
        notes.append("Captions: corpus BLEU with brevity penalty; ROUGE-L F1 (LCS) averaged over captions.")
    body = _table(["metric", *groups], rows) + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return f"# qilin-lite eval: {metrics.get('task')}\n\n" + body


def metrics_from_predictions(path: str | Path) -> dict:
    """Recompute metrics from a predictions.jsonl alone (its lines carry everything scoring needs)."""
    path = Path(path)
    items, preds = [], []
    for n, rec in _scan(path)[0]:
        try:
            items.append(
                EvalItem(str(rec["id"]), rec.get("image"), rec.get("question") or "", str(rec["reference"]),
                         rec["task"], rec["kind"], rec.get("choices"), rec.get("lang"))
            )
        except (KeyError, ValueError) as e:
            raise UserError(
                f"{where(path, n, str(rec.get('id')))}: not a qilin-lite predictions line ({e}); compare needs "
                "predictions.jsonl written by `qilin-lite eval`, a metrics.json, or a run directory"
            ) from None
        preds.append(rec["prediction"])
    if not items:
        raise UserError(f"{path}: no predictions in the file")
    return aggregate(items, preds)


def _load_system(p: Path) -> tuple[str, dict]:
    if p.is_dir():
        for name in (METRICS, PREDICTIONS):
            if (p / name).is_file():
                return _load_system(p / name)
        raise UserError(f"{p}: no {METRICS} or {PREDICTIONS} in this directory; pass an eval --out directory")
    if not p.is_file():
        raise UserError(f"{p}: no such file or directory")
    name = p.resolve().parent.name if p.name in (METRICS, PREDICTIONS) else p.stem
    if p.suffix.lower() == ".json":
        try:
            metrics = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{where(p, e.lineno)}: not valid JSON ({e.msg})") from None
        if not isinstance(metrics, dict) or not isinstance(metrics.get("groups"), dict):
            raise UserError(f"{p}: not a metrics.json written by `qilin-lite eval` (no \"groups\")")
        return name, metrics
    return name, metrics_from_predictions(p)


def compare(paths: Sequence[str | Path]) -> str:
    """One Markdown table, a column per system, from predictions.jsonl files, metrics.json files or run dirs."""
    if not paths:
        raise UserError("compare needs at least one predictions.jsonl, metrics.json or eval output directory")
    systems: list[tuple[str, dict]] = []
    for p in paths:
        name, metrics = _load_system(Path(p))
        taken = {s for s, _ in systems}
        base, k = name, 2
        while name in taken:
            name, k = f"{base} ({k})", k + 1
        systems.append((name, metrics))
    group_names = ["all"] + sorted({g for _, m in systems for g in m["groups"] if g != "all"})
    rows = [["task"] + [str(m.get("task")) for _, m in systems]]
    for g in group_names:
        for key, label in METRIC_LABELS.items():
            cells = [m["groups"].get(g, {}).get(key) for _, m in systems]
            if all(c is None for c in cells):
                continue
            rows.append([label if g == "all" else f"{label} [{g}]"] + [_fmt(key, c) for c in cells])
    return _table(["metric", *(s for s, _ in systems)], rows)


# ---------------------------------------------------------------- the model side


def model_generate(
    model_dir: str | Path,
    *,
    bits: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    dtype: str = "auto",
    template: str | None = None,
) -> Callable[[list[EvalItem]], list[str]]:
    """Load a model directory once; return `generate(items) -> answers` for `run_eval` (greedy decoding).

    Each item is one user turn, "<image>\n" + `format_prompt(item)` (no image token for an item without an image),
    rendered in the run's template (or `template`); `batch_size` items go through the model at a time.
    dtype "auto" is bfloat16 on a GPU that has it, else float32.
    """
    from qilin_lite.generate import generator_for

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    override = get_template(template) if template is not None else None  # a bad name fails before loading
    if dtype == "auto":
        import torch

        dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    gen = generator_for(str(model_dir), bits=bits, dtype=dtype, max_new_tokens=max_new_tokens, temperature=0.0)
    if override is not None:
        gen.template = override

    def generate(items: list[EvalItem]) -> list[str]:
        answers: list[str] = []
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            conversations = [
                [{"role": "user", "content": (f"{IMAGE_TOKEN}\n" if it.image else "") + format_prompt(it)}]
                for it in batch
            ]
            answers += gen.generate(conversations, [[it.image] if it.image else [] for it in batch])
        return answers

    return generate


def _load_on_first_call(load: Callable[[], Callable]) -> Callable:
    """A `generate` that loads the model when first asked: bad flags, missing images and a resume with nothing
    left to do then never wait minutes for a 13B model."""
    loaded: list[Callable] = []

    def generate(batch):
        if not loaded:
            loaded.append(load())
        return loaded[0](batch)

    return generate


def run_benchmark(
    data: str | Path,
    task: str,
    out: str | Path,
    *,
    model: str | Path | None = None,
    predictions: str | Path | None = None,
    image_folder: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    bits: int | None = None,
    dtype: str = "auto",
) -> dict:
    """`qilin-lite eval run`: read DATA as TASK, answer with MODEL (or take PREDICTIONS), write OUT; the metrics."""
    items = load_eval_items(data, task, image_folder)
    generate = None
    if model is not None:
        generate = _load_on_first_call(
            lambda: model_generate(model, bits=bits, max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=dtype)
        )
    return run_eval(items, generate, out, batch_size=batch_size, limit=limit, predictions_file=predictions)


def score_demo_heldout(
    model_dir: str | Path, heldout_path: str | Path, images_dir: str | Path, template: str | None = None
) -> dict:
    """The demo's held-out accuracy, by the eval code: {"accuracy": over all records, "per_task": {task: accuracy}}.

    Every held-out record has `choices`, `answer` and `task` (side, modality, ...); read as task "llava" they are
    choice items, right when the greedy answer names the reference option and no other. `template` overrides the
    run's own (the demo asks its align run, trained on the plain template, in the tune run's template).
    Decoding matches the demo's own runs: float32, 8 new tokens, 16 questions per batch.
    """
    path = Path(heldout_path)
    items = load_eval_items(path, "llava", images_dir)
    not_choice = [it.id for it in items if it.kind != "choice"]
    if not_choice:
        raise UserError(f"{where(path, record_id=not_choice[0])}: held-out records need choices and an answer")
    labels = [str(rec.get("task", "llava")) for _, _, rec in _read_records(path)]  # one per item, same order
    _check_images(items)
    answers = model_generate(model_dir, max_new_tokens=8, batch_size=16, dtype="float32", template=template)(items)

    def accuracy(pick: list[int]) -> float:
        return aggregate([items[i] for i in pick], [answers[i] for i in pick])["groups"]["all"]["accuracy"]

    per_task = {t: accuracy([i for i, x in enumerate(labels) if x == t]) for t in dict.fromkeys(labels)}
    return {"accuracy": accuracy(list(range(len(items)))), "per_task": per_task}


# ---------------------------------------------------------------- command line


class _RunByDefault(TyperGroup):
    """`qilin-lite eval --model ...` is short for `qilin-lite eval run --model ...`."""

    def parse_args(self, ctx, args):
        if args and args[0].startswith("-") and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    cls=_RunByDefault,
    no_args_is_help=True,
    help="Score a model on a medical VQA / caption benchmark (`eval run`, or just `eval --model ...`); "
    "compare runs.",
)


@eval_app.command("run")
def eval_run(
    data: Annotated[Path, typer.Option("--data", help="benchmark file in its published layout (docs/eval.md)")],
    task: Annotated[str, typer.Option("--task", help=" | ".join(TASKS))],
    out: Annotated[Path, typer.Option("--out", help="directory for predictions.jsonl, metrics.json, report.md; "
                                                    "rerun into it to resume")],
    model: Annotated[Optional[str], typer.Option("--model", help="qilin-lite run directory or Llava model")] = None,
    image_folder: Annotated[Optional[Path], typer.Option(
        "--image-folder", help="folder the image names are relative to (default: the data file's folder)")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="score only the first N questions")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="questions per forward pass")] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="longest answer, in tokens")] = 64,
    load_4bit: Annotated[bool, typer.Option("--load-4bit", help="LLM in 4-bit NF4 (a 13B model on one GPU)")] = False,
    predictions: Annotated[Optional[Path], typer.Option(
        "--predictions", help="score answers made elsewhere (JSONL / JSON with id + prediction); no model")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (bfloat16 on GPU, else float32) | bfloat16 | "
                                                       "float16 | float32")] = "auto",
):
    """Answer a benchmark with a model (or score answers made elsewhere); write predictions, metrics and a report."""
    metrics = run_benchmark(data, task, out, model=model, predictions=predictions, image_folder=image_folder,
                            limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            bits=4 if load_4bit else None, dtype=dtype)
    typer.echo(render_report(metrics))
    typer.echo("written: " + ", ".join(str(Path(out) / name) for name in (PREDICTIONS, METRICS, REPORT)))


@eval_app.command("compare")
def eval_compare(
    paths: Annotated[list[Path], typer.Argument(help="eval --out directories, metrics.json or predictions.jsonl")],
):
    """One Markdown table with a column per run."""
    typer.echo(compare(paths), nl=False)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
