"""`qilin-lite data inspect`: records -> the tokens training builds from them, supervised ones marked.

In:  a training file (as `align` / `tune` read it), a base or run directory (its tokenizer, image tokens and, for a
     run, its template, max length and length mode from recipe.yaml), or a recipe for those settings.
Out: per record the tokens (the image as one `<image ×N>` run), the supervised ones in colour on a terminal or in
     [brackets] otherwise, how many are supervised, and where and why the cut fell; with `--json`, one object per
     line, `{"id", "input_ids", "labels"}`, exactly as the model receives them (images expanded, -100 unsupervised).

What a user reaches for when a loss looks wrong: it calls the same `processing.encode_detail` training calls.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import UserError, printable

GREEN, RESET = "\033[32m", "\033[0m"


def _settings(model: str, recipe: str | None) -> dict:
    """Template / max length / length mode a run trained with (its recipe.yaml), or a recipe's."""
    from ..config import load_recipe
    from ..model import RunInfo

    out: dict = {}
    p = Path(model)
    info = RunInfo.load(p) if p.is_dir() else None
    if info is not None:
        out["template"] = info.template
    source = recipe or (str(p / "recipe.yaml") if (p / "recipe.yaml").is_file() else None)
    if source:
        r = load_recipe(source)
        # an explicit --recipe wins; a run's own recipe.yaml agrees with its qilin.json
        out.update(max_length=r.data.max_length, length_mode=r.data.length_mode)
        out["template"] = r.template if recipe else out.get("template", r.template)
    return out


def inspect_records(file, model: str, *, image_folder=None, recipe: str | None = None, template: str | None = None,
                    max_length: int | None = None, length_mode: str | None = None, n: int = 3,
                    as_json: bool = False, color: bool | None = None, out=None) -> list[dict]:
    from ..families import get_template
    from ..encoding import IGNORE, TokenLayout, encode_detail
    from .check import model_facts
    from .records import BadRecord, read_records

    out = out or sys.stdout
    if n < 1:
        raise UserError(f"-n must be at least 1, not {n}")
    run = _settings(model, recipe)
    tok, image_id, per_image, _, counts_of = model_facts(model)
    tpl = get_template(template or run.get("template") or "vicuna_v1")
    mode = length_mode or run.get("length_mode", "text")
    if mode not in ("text", "total"):
        raise UserError(f"--length-mode must be text or total, not '{mode}'")
    layout = TokenLayout(image_id, per_image, max_length or run.get("max_length", 2048), mode)
    rejects: list = []
    try:
        records = read_records(file, image_folder, skip_bad=True, rejects=rejects)[:n]
    except UserError:
        if not rejects:
            raise
        first = rejects[0]
        from ..errors import where

        raise UserError(f"{file}: every record was rejected; the first, {where(first.source, first.line, first.id)}: "
                        f"{first.reason}") from None
    if color is None:
        color = out.isatty() and "NO_COLOR" not in os.environ
    shown = []
    for rec in records:
        try:
            e = encode_detail(rec.messages, tpl, tok, layout, counts_of(rec) if counts_of else None)
        except BadRecord as err:
            row = {"id": rec.id, "error": str(err)}
            print(json.dumps(row, ensure_ascii=False) if as_json
                  else f"── {rec.where}: cannot be trained on: {printable(err)}", file=out)
            shown.append(row)
            continue
        ids, labels = e.input_ids.tolist(), e.labels.tolist()
        row = {"id": rec.id, "input_ids": ids, "labels": labels}
        shown.append(row)
        if as_json:
            print(json.dumps(row, ensure_ascii=False), file=out)
            continue
        supervised = sum(x != IGNORE for x in labels)
        n_img = sum(i == image_id for i in ids)
        counts = f"of {per_image}" if per_image else f"at native resolution, {n_img} tokens in all"
        n_shown = n_img // per_image if per_image else len(rec.images)
        shown_as = (f"{n_shown} image(s) {counts}, {tpl.multi_image}" if n_img else "no image")
        print(f"── {rec.where} ── template {tpl.name}, {len(ids)} positions ({n_img} image: {shown_as}), "
              f"{supervised} supervised; cut: {e.cut or 'none'}", file=out)
        print(_render(ids, labels, tok, image_id, color, per_image), file=out)
    if not as_json:
        legend = f"{GREEN}green{RESET}" if color else "[brackets]"
        print(f"supervised tokens in {legend}; max_length {layout.max_length} ({mode}: "
              + ("text ids, an image counting one)" if mode == "text" else "every position)"), file=out)
    return shown


def _render(ids: list[int], labels: list[int], tok, image_id: int, color: bool, per_image: int) -> str:
    from ..encoding import IGNORE

    pieces, k = [], 0
    names = tok.convert_ids_to_tokens(ids)
    while k < len(ids):
        if ids[k] == image_id:
            j = k
            while j < len(ids) and ids[j] == image_id:
                j += 1
            if per_image:
                pieces.extend([f"<image ×{per_image}>"] * ((j - k) // per_image))  # adjacent images: one run each
            else:  # native resolution: each image's own count, its run closed by the family's end-of-image token
                pieces.append(f"<image ×{j - k}>")
            k = j
            continue
        name = names[k] if names[k] is not None else f"<{ids[k]}>"
        name = printable(name)  # a token's newline or control character, shown escaped
        if labels[k] != IGNORE:
            name = f"{GREEN}{name}{RESET}" if color else f"[{name}]"
        pieces.append(name)
        k += 1
    return " ".join(pieces)
