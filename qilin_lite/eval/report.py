"""Metrics -> Markdown: one run's report.md, and `eval compare`'s table with a column per run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError, where
from .items import METRICS, PREDICTIONS, EvalItem, scan_predictions
from .metrics import METRIC_LABELS, aggregate, item_values, score_item
from .protocol import PROTOCOL, RUN_DETAILS, differences, model_notes
from .reliance import verdict
from .stats import paired


def _fmt(key: str, value: Any, ci: list | None = None) -> str:
    if value is None:
        return "–"
    if key == "n" or key.startswith("n_"):
        return str(int(value))
    return f"{100 * value:.2f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_report(metrics: dict) -> str:
    """metrics.json as Markdown: one row per metric, one column per group (all, then each language)."""
    groups = metrics["groups"]
    keys = [k for k in METRIC_LABELS if any(k in g for g in groups.values())]
    rows = [[METRIC_LABELS[k]] + [_fmt(k, g.get(k), g.get("ci95", {}).get(k)) for g in groups.values()]
            for k in keys]
    notes = ["Scores in %; counts as numbers. Chinese text is tokenized by character, English by word."]
    if any("ci95" in g for g in groups.values()):
        b = metrics.get("bootstrap", {})
        notes.append(f"[low, high]: 95% bootstrap interval over the questions ({b.get('resamples')} resamples, "
                     f"seed {b.get('seed')}).")
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
    head = f"# qilin-lite eval: {metrics.get('task')}\n\n"
    if metrics.get("judge", {}).get("n_open"):
        j = metrics["judge"]
        body += (f"\n## Judge ({j['model']}, prompt v{j['prompt_version']})\n\n" + _table(
            ["open questions", "judged right", "unreadable verdicts", "agreement with recall >= 0.5", "Cohen's kappa"],
            [[str(j["n_open"]), _fmt("accuracy", j["accuracy"], j["ci95"]), str(j["unreadable"]),
              f"{100 * j['agreement_with_recall']:.1f}%", f"{j['kappa_with_recall']:.2f}"]]))
    if metrics.get("image_reliance"):
        head += verdict(metrics["image_reliance"]) + "\n\n"
        body += "\n" + _reliance_table(metrics["image_reliance"])
    return head + body


def _reliance_table(image_reliance: dict) -> str:
    rows = []
    for control, r in image_reliance.items():
        for metric, m in r["metrics"].items():
            p = m["paired"]
            rows.append([METRIC_LABELS.get(metric, metric), control, f"{100 * m['with_image']:.2f}",
                         f"{100 * m['control']:.2f}", f"{100 * p['diff']:+.2f} [{100 * p['ci95'][0]:+.1f}, "
                         f"{100 * p['ci95'][1]:+.1f}]", f"{p['p']:.3g}{' *' if p['significant'] else ''}",
                         f"{100 * r['changed']:.0f}%"])
    return ("## Image reliance (eval --image-blind)\n\n" + _table(
        ["metric", "control", "with image", "without", "difference [95%]", "p", "answers changed"], rows)
        + "\n- blank: the image replaced by a blank one of its size in the padding colour; swapped: another "
          "question's image. p: McNemar exact (right/wrong) or paired bootstrap; * below 0.05.\n")


def _items_and_predictions(path: Path) -> tuple[list[EvalItem], list[str]]:
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
    return items, preds


def metrics_from_predictions(path: str | Path) -> dict:
    """Recompute metrics from a predictions.jsonl alone (its lines carry everything scoring needs)."""
    return aggregate(*_items_and_predictions(Path(path)))


def _load_system(p: Path) -> tuple[str, dict, Path | None]:
    """(name, metrics, the predictions.jsonl beside them or None)."""
    if p.is_dir():
        for name in (METRICS, PREDICTIONS):
            if (p / name).is_file():
                return _load_system(p / name)
        raise UserError(f"{p}: no {METRICS} or {PREDICTIONS} in this directory; pass an eval --out directory")
    if not p.is_file():
        raise UserError(f"{p}: no such file or directory")
    name = p.resolve().parent.name if p.name in (METRICS, PREDICTIONS) else p.stem
    beside = p.parent / PREDICTIONS
    if p.suffix.lower() == ".json":
        try:
            metrics = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{where(p, e.lineno)}: not valid JSON ({e.msg})") from None
        if not isinstance(metrics, dict) or not isinstance(metrics.get("groups"), dict):
            raise UserError(f"{p}: not a metrics.json written by `qilin-lite eval` (no \"groups\")")
        return name, metrics, beside if beside.is_file() else None
    metrics = metrics_from_predictions(p)
    if (p.parent / PROTOCOL).is_file():
        metrics["protocol"] = json.loads((p.parent / PROTOCOL).read_text(encoding="utf-8"))
    return name, metrics, p


def _values_by_id(path: Path) -> dict[str, dict[str, float]]:
    items, preds = _items_and_predictions(path)
    return {it.id: item_values(it.kind, score_item(it, p)) for it, p in zip(items, preds)}


def compare(paths: Sequence[str | Path], *, allow_protocol_diff: bool = False) -> str:
    """One Markdown table, a column per system, from predictions.jsonl files, metrics.json files or run dirs; then
    each system after the first tested against the first on the questions both answered."""
    if not paths:
        raise UserError("compare needs at least one predictions.jsonl, metrics.json or eval output directory")
    systems: list[tuple[str, dict, Path | None]] = []
    for p in paths:
        name, metrics, preds = _load_system(Path(p))
        taken = {s for s, _, _ in systems}
        base, k = name, 2
        while name in taken:
            name, k = f"{base} ({k})", k + 1
        systems.append((name, metrics, preds))
    head, notes = [], []
    first_name, first, first_preds = systems[0]
    for name, metrics, _ in systems[1:]:
        a, b = first.get("protocol"), metrics.get("protocol")
        if a is None or b is None:
            notes.append(f"no protocol recorded for {first_name if a is None else name} (an older qilin-lite): "
                         "whether the runs were scored alike is not checked")
            continue
        diff = differences(a, b, skip=RUN_DETAILS)  # how each ran (a server, a dtype) goes into the notes
        if diff and not allow_protocol_diff:
            raise UserError(f"{first_name} and {name} were not scored the same way ({'; '.join(diff)}); compare runs "
                            "of one protocol, or pass --allow-protocol-diff")
        if diff:
            head.append(f"**WARNING: {first_name} and {name} were not scored the same way**: {'; '.join(diff)}.")
        notes += [f"{first_name} vs {name}, from the models themselves: {d}" for d in model_notes(a, b)]
    group_names = ["all"] + sorted({g for _, m, _ in systems for g in m["groups"] if g != "all"})
    rows = [["task"] + [str(m.get("task")) for _, m, _ in systems]]
    for g in group_names:
        for key, label in METRIC_LABELS.items():
            groups = [m["groups"].get(g, {}) for _, m, _ in systems]
            if all(gr.get(key) is None for gr in groups):
                continue
            rows.append([label if g == "all" else f"{label} [{g}]"] +
                        [_fmt(key, gr.get(key), gr.get("ci95", {}).get(key)) for gr in groups])
    out = "".join(h + "\n\n" for h in head) + _table(["metric", *(s for s, _, _ in systems)], rows)
    out += _paired_table(systems, notes)
    if notes:
        out += "\n" + "".join(f"- {n}\n" for n in notes)
    return out


def _paired_table(systems, notes: list[str]) -> str:
    first_name, _, first_preds = systems[0]
    if len(systems) < 2:
        return ""
    if first_preds is None:
        notes.append(f"no predictions.jsonl beside {first_name}'s metrics: no paired tests")
        return ""
    base = _values_by_id(first_preds)
    rows = []
    for name, _, preds in systems[1:]:
        if preds is None:
            notes.append(f"no predictions.jsonl beside {name}'s metrics: no paired test for it")
            continue
        other = _values_by_id(preds)
        common = [i for i in base if i in other]
        if len(common) < len(base) or len(common) < len(other):
            notes.append(f"{name}: paired tests on the {len(common)} questions both runs answered")
        for metric in METRIC_LABELS:
            ids = [i for i in common if metric in base[i] and metric in other[i]]
            if not ids:
                continue
            t = paired([base[i][metric] for i in ids], [other[i][metric] for i in ids])
            rows.append([METRIC_LABELS[metric], f"{name} − {first_name}", str(len(ids)), f"{100 * t['diff']:+.2f}",
                         f"[{100 * t['ci95'][0]:+.2f}, {100 * t['ci95'][1]:+.2f}]", f"{t['p']:.3g}", t["test"],
                         "yes" if t["significant"] else "no"])
    if not rows:
        return ""
    return (f"\nPaired differences against {first_name} (same questions; 95% paired-bootstrap interval):\n\n" +
            _table(["metric", "runs", "n", "difference", "95% interval", "p", "test", "significant (p < 0.05)"],
                   rows))
