"""Scoring for `qilin-lite eval`: a score per item (`score_item`) and one metrics dict per run (`aggregate`);
pure functions, no model and no files.

In:  EvalItems (or anything with their kind, reference, choices, task, lang, id) and a model's free-text answers.
Out: per item {"correct", "extracted", ...}; per run the metrics dict below.

The rule per item kind (the rules themselves, and how they differ from LLaVA-Med's, are in matching.py):
- choice: `extract_option`'s letter equals the reference; OmniMedVQA's and MMMU's questions are scored by their
  authors' rules instead (omnimedvqa.py, mmmu.py).
- closed: `closed_strict` (the score) and `closed_llavamed` (LLaVA-Med's figure, beside it).
- open: `open_recall`.
- caption: ROUGE-L per item; corpus BLEU-1..4 per run.
- short (MMMU's open questions): MMMU's rule (mmmu.py).

Metrics dict (`aggregate`): {"task", "n", "groups": {"all": {...}, "en": {...}, "zh": {...}}}; a language group
appears when items carry `lang` (SLAKE). Values are fractions in [0, 1]; keys `n_*` are counts.
"""

from __future__ import annotations

from typing import Any, Sequence

from .matching import (answer_part, closed_llavamed, closed_strict, corpus_bleu, extract_option, open_recall, rouge_l, tokenize,
                       yes_no)
from .mmmu import mmmu_choice, mmmu_short_correct
from .omnimedvqa import omnimedvqa_choice
from .stats import BOOTSTRAP, bootstrap_ci

# Display names, in report order; `report.render_report` and `compare` print the keys present.
METRIC_LABELS = {
    "n": "n",
    "n_choice": "n (choice)",
    "accuracy": "accuracy",
    "n_no_option": "no option found (count)",
    "n_closed": "n (closed)",
    "closed_llavamed": "closed acc, LLaVA-Med rule",
    "closed_strict": "closed acc, strict",
    "n_open": "n (open)",
    "open_recall": "open recall",
    "n_caption": "n (caption)",
    "bleu1": "BLEU-1",
    "bleu2": "BLEU-2",
    "bleu3": "BLEU-3",
    "bleu4": "BLEU-4",
    "rougeL": "ROUGE-L (F1)",
    "n_short": "n (short answer)",
    "short_accuracy": "short-answer acc (MMMU rule)",
}


# ---------------------------------------------------------------- per item and per run


def score_item(item: Any, prediction: Any) -> dict:
    """{"correct": bool or float, "extracted": ...} (+ "correct_llavamed" for closed) for one EvalItem. A reply in
    the reasoning layout is scored on its <answer> part (matching.answer_part); reinforce's reward is this score."""
    prediction = answer_part(prediction)
    if item.kind == "choice":
        if item.task in ("omnimedvqa", "mmmu"):  # their authors' rules (omnimedvqa.py, mmmu.py)
            letter = (omnimedvqa_choice(prediction, item.choices or []) if item.task == "omnimedvqa"
                      else mmmu_choice(prediction, item.choices or [], item.id))
        else:
            letter = extract_option(prediction, item.choices or [])
        return {"correct": letter is not None and letter == item.reference, "extracted": letter}
    if item.kind == "closed":
        return {
            "correct": closed_strict(prediction, item.reference),
            "correct_llavamed": closed_llavamed(prediction, item.reference),
            "extracted": yes_no(prediction),
        }
    if item.kind == "open":
        return {"correct": open_recall(prediction, item.reference), "extracted": None}
    if item.kind == "caption":
        return {"correct": rouge_l(tokenize(prediction), tokenize(item.reference)), "extracted": None}
    if item.kind == "short":  # MMMU's open questions, by MMMU's rule (mmmu.py)
        return {"correct": mmmu_short_correct(prediction, item.reference), "extracted": None}
    raise ValueError(f"unknown item kind {item.kind!r}")


def _mean(xs: Sequence[float]) -> float:
    return round(sum(float(x) for x in xs) / len(xs), 6)


# the per-question value each mean metric averages, from a score_item result (and `eval compare`'s paired tests)
MEAN_METRICS = {"choice": {"accuracy": "correct"}, "closed": {"closed_llavamed": "correct_llavamed",
                "closed_strict": "correct"}, "open": {"open_recall": "correct"}, "caption": {"rougeL": "correct"},
                "short": {"short_accuracy": "correct"}}


def item_values(kind: str, score: dict) -> dict[str, float]:
    return {metric: float(score[field]) for metric, field in MEAN_METRICS.get(kind, {}).items()}


def _group(items: Sequence[Any], predictions: Sequence[Any]) -> dict:
    scores = [score_item(it, p) for it, p in zip(items, predictions, strict=True)]
    out: dict[str, Any] = {"n": len(items)}
    by_kind: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_kind.setdefault(it.kind, []).append(i)
    if idx := by_kind.get("choice"):
        out["n_choice"] = len(idx)
        out["n_no_option"] = sum(scores[i]["extracted"] is None for i in idx)
    for kind in ("closed", "open", "caption", "short"):
        if idx := by_kind.get(kind):
            out[f"n_{kind}"] = len(idx)
    if idx := by_kind.get("caption"):
        bleu = corpus_bleu([tokenize(predictions[i]) for i in idx], [tokenize(items[i].reference) for i in idx])
        for n, b in enumerate(bleu, start=1):
            out[f"bleu{n}"] = round(b, 6)
    ci = {}
    for kind, idx in by_kind.items():
        for metric in MEAN_METRICS.get(kind, {}):
            values = [item_values(kind, scores[i])[metric] for i in idx]
            out[metric] = _mean(values)
            ci[metric] = bootstrap_ci(values)
    if ci:
        out["ci95"] = ci
    return out


def aggregate(items: Sequence[Any], predictions: Sequence[Any]) -> dict:
    """Metrics over all items, and per language when items carry one (SLAKE's en / zh halves)."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    tasks = sorted({it.task for it in items})
    groups = {"all": _group(items, predictions)}
    for lang in sorted({it.lang for it in items if it.lang}):
        pick = [i for i, it in enumerate(items) if it.lang == lang]
        groups[lang] = _group([items[i] for i in pick], [predictions[i] for i in pick])
    return {"task": "+".join(tasks) if tasks else None, "n": len(items), "groups": groups, "bootstrap": BOOTSTRAP}
