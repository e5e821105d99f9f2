"""Metrics -> Markdown: one run's report.md, and `eval compare`'s table with a column per run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError, where
from .items import METRICS, PREDICTIONS, EvalItem, scan_predictions
from .metrics import METRIC_LABELS, aggregate


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
    for n, rec in scan_predictions(path)[0]:
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
