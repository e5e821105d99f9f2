"""`qilin-lite data stats`: the paper's Table 1/2 for a LLaVA file.

In:  a LLaVA JSON/JSONL file (streamed), optionally a tokenizer (model or run directory) and the image folder.
Out: pairs, tokens, max, median (Q1, Q3) per text field and source; image sizes read from headers; a PNG of the
     length histograms with the numbers as JSON beside it.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..families import IMAGE_TOKEN
from ..errors import UserError
from .items import image_names
from .records import BadRecord, messages_from_llava
from .rows import iter_rows


def _record_texts(row: dict) -> list[tuple[str, str]]:
    """(field, text) pairs of one LLaVA record: caption/context for image-description records, else question and
    answer per turn pair. Builds write `task`; other files are classed by their first human turn (image only ->
    caption). Question text is what training sees: the prompt wording included, `<image>` removed."""
    try:  # the turns as training parses them; a record training would refuse adds nothing here
        messages = messages_from_llava(row.get("conversations", row.get("messages")))
    except BadRecord:
        return []
    turns = [(m["role"], m["content"].replace(IMAGE_TOKEN, "").strip()) for m in messages
             if m["role"] in ("user", "assistant")]
    task = row.get("task")
    if task not in ("caption", "context", "vqa", "dialog"):
        task = "caption" if turns[:1] and turns[0][0] == "user" and not turns[0][1] else "vqa"
    if task in ("caption", "context"):
        return [(task, v) for r, v in turns if r == "assistant"][:1]
    return [("question" if r == "user" else "answer", v) for r, v in turns]


def _describe(values: np.ndarray) -> dict:
    q1, med, q3 = np.percentile(values, [25, 50, 75])  # numpy's default "linear" quantiles
    return {"pairs": int(len(values)), "total": int(values.sum()), "max": int(values.max()), "min": int(values.min()),
            "median": float(med), "q1": float(q1), "q3": float(q3), "mean": float(values.mean())}


def data_stats(
    path: str | Path,
    *,
    model: str | Path | None = None,
    image_folder: str | Path | None = None,
    out: str | Path | None = "stats.png",
    batch: int = 1024,
) -> dict:
    """Lengths per text field and source (tokens with `model`'s tokenizer, else characters), image sizes from
    headers when `image_folder` is given; writes a PNG of the length histograms (and the numbers as JSON beside it).
    Quantiles use numpy's default linear interpolation (Q1 = 25th percentile, Q3 = 75th)."""
    from PIL import Image

    path = Path(path)
    tok = None
    if model is not None:
        from ..model import load_tokenizer_and_processor

        tok, _ = load_tokenizer_and_processor(str(model))
    lengths: dict[tuple[str, str], list[int]] = defaultdict(list)
    pending: list[tuple[tuple[str, str], str]] = []
    images: set[str] = set()
    bad_rows = records = 0

    def flush():
        if not pending:
            return
        texts = [t for _, t in pending]
        if tok is None:
            ns = [len(t) for t in texts]
        else:
            ns = [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]
        for (key, _), n in zip(pending, ns):
            lengths[key].append(n)
        pending.clear()

    for _, row, error in iter_rows(path):
        if error:
            bad_rows += 1
            continue
        records += 1
        source = row.get("source") if isinstance(row.get("source"), str) and row.get("source") else path.name
        for fld, text in _record_texts(row):
            pending.append(((source, fld), text))
        for name in image_names(row.get("image", row.get("images")), split=False) if image_folder else []:
            images.add(name)
        if len(pending) >= batch:
            flush()
    flush()
    if not lengths:
        unreadable = f" ({bad_rows} unreadable rows)" if bad_rows else ""
        raise UserError(f"{path}: no records with text to describe{unreadable}; is it a LLaVA conversation file?")
    table = []
    fields = sorted({f for _, f in lengths}, key=["caption", "context", "question", "answer"].index)
    sources = sorted({s for s, _ in lengths})
    for src in sources + (["all"] if len(sources) > 1 else []):
        for fld in fields:
            vals = [n for (s, f), ns in lengths.items() if f == fld and (src == "all" or s == src) for n in ns]
            if vals:
                table.append({"source": src, "field": fld, **_describe(np.asarray(vals, dtype=np.int64))})
    result: dict[str, Any] = {"file": str(path), "records": records, "bad_rows": bad_rows,
                              "unit": "tokens" if tok is not None else "characters", "fields": table}
    if image_folder:
        folder = Path(image_folder)

        def size(name: str):
            p = folder / name
            if not p.is_file():
                return "missing"
            try:
                with Image.open(p) as im:  # reads the header only: no pixel decoding
                    return im.size
            except Exception:  # noqa: BLE001 - any header failure is "unreadable" in the statistics
                return "unreadable"

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
            sizes = list(pool.map(size, sorted(images)))
        ok = np.array([s for s in sizes if isinstance(s, tuple)], dtype=np.int64).reshape(-1, 2)
        result["images"] = {"referenced": len(images), "found": len(ok), "missing": sizes.count("missing"),
                            "unreadable": sizes.count("unreadable")}
        if len(ok):
            result["images"].update(width=_describe(ok[:, 0]), height=_describe(ok[:, 1]))
    if out is not None:
        out = Path(out)
        _plot(lengths, fields, result, out, ok if image_folder and len(ok) else None)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        result["png"] = str(out)
    return result


def _plot(lengths, fields, result, out: Path, sizes) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = len(fields) + (sizes is not None)
    fig = Figure(figsize=(4.5 * panels, 3.6))
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch, works headless
    for i, fld in enumerate(fields):
        ax = fig.add_subplot(1, panels, i + 1)
        for (src, f), ns in sorted(lengths.items()):
            if f == fld:
                ax.hist(ns, bins=50, alpha=0.6, label=src)
        ax.set_title(fld)
        ax.set_xlabel(result["unit"])
        ax.set_ylabel("records")
        ax.legend(fontsize=7)
    if sizes is not None:
        ax = fig.add_subplot(1, panels, panels)
        ax.scatter(sizes[:, 0], sizes[:, 1], s=4, alpha=0.5)
        ax.set_title("image sizes")
        ax.set_xlabel("width (px)")
        ax.set_ylabel("height (px)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def format_stats(result: dict) -> str:
    unit = result["unit"]
    bad = f", {result['bad_rows']} unreadable rows" if result["bad_rows"] else ""
    lines = [f"{result['file']}: {result['records']} records{bad}",
             f"{'source':<20} {'field':<9} {'pairs':>8} {unit:>12} {'max':>7}  median (Q1, Q3)"]
    for r in result["fields"]:
        lines.append(f"{r['source'][:20]:<20} {r['field']:<9} {r['pairs']:>8} {r['total']:>12,} {r['max']:>7}  "
                     f"{r['median']:g} ({r['q1']:g}, {r['q3']:g})")
    im = result.get("images")
    if im:
        lines.append(f"images: {im['referenced']} referenced, {im['found']} found, {im['missing']} missing, "
                     f"{im['unreadable']} unreadable")
        for side in ("width", "height"):
            if side in im:
                d = im[side]
                lines.append(f"  {side}: median {d['median']:g} (Q1 {d['q1']:g}, Q3 {d['q3']:g}), "
                             f"min {d['min']}, max {d['max']}")
    if "png" in result:
        lines.append(f"histograms: {result['png']}")
    return "\n".join(lines)
