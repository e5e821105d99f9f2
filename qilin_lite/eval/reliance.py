"""Does the model look at the image? The same questions again with the image taken away (`eval --image-blind`).

Two controls, each answered into its own predictions file beside predictions.jsonl (resumable the same way):
- blank: the image replaced by a blank one of the same size, in the model's padding colour (its processor's mean,
  what LLaVA pads with), so the model sees an image of the usual shape with nothing in it;
- swapped: the image of another question of the same benchmark (a fixed rotation of the distinct images by half
  their number, so every question gets a different image than its own and a rerun the same one).

For each score: its value with the image and under each control, the paired test between them (stats.paired) and
the share of answers that changed. A model whose score does not drop significantly under the blank control is
flagged in the report's first lines: its answers do not come from the image.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..files import save_image_atomic
from .items import EvalItem
from .matching import normalize_text
from .metrics import MEAN_METRICS, item_values, score_item
from .stats import paired

CONTROLS = ("blank", "swapped")
HEADLINE = ("accuracy", "closed_llavamed", "open_recall", "rougeL")  # the score a verdict is drawn from


def image_size(path: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError):  # DICOM and other formats PIL does not read: decode it
        from ..images.decode import load_image

        return load_image(path).size


def control_items(items: Sequence[EvalItem], control: str, folder: Path, fill: tuple[int, int, int]) -> list[EvalItem]:
    """`items` with their images replaced as `control` says; blank images are written once per size to `folder`."""
    if control not in CONTROLS:
        raise UserError(f"unknown image control {control!r}; choose from {', '.join(CONTROLS)}")
    if control == "swapped":
        distinct = list(dict.fromkeys(it.image for it in items if it.image))
        if len(distinct) < 2:
            raise UserError("the swapped-image control needs a benchmark with at least two different images")
        other = {img: distinct[(k + len(distinct) // 2) % len(distinct)] for k, img in enumerate(distinct)}
        # another question's image (its composite): the question's own parts go too
        return [dataclasses.replace(it, image=other[it.image], parts=()) if it.image else it for it in items]
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    blanks: dict[str, str] = {}
    out = []

    def blank(image: str) -> str:  # a blank of the image's size, one file per size
        if image not in blanks:
            w, h = image_size(image)
            path = folder / f"blank-{w}x{h}.png"
            if not path.exists():
                save_image_atomic(Image.new("RGB", (w, h), fill), path)
            blanks[image] = str(path)
        return blanks[image]

    for it in items:
        out.append(dataclasses.replace(it, image=blank(it.image), parts=tuple(blank(p) for p in it.parts))
                   if it.image else it)
    return out


def reliance(items: Sequence[EvalItem], with_image: Sequence[str], without: Sequence[str]) -> dict:
    """Scores with the image and under a control, their paired tests, and the share of answers that changed."""
    values: dict[str, tuple[list[float], list[float]]] = {}
    for it, a, b in zip(items, with_image, without, strict=True):
        va, vb = item_values(it.kind, score_item(it, a)), item_values(it.kind, score_item(it, b))
        for metric in MEAN_METRICS.get(it.kind, {}):
            pair = values.setdefault(metric, ([], []))
            pair[0].append(va[metric])
            pair[1].append(vb[metric])
    metrics = {m: {"with_image": round(sum(a) / len(a), 6), "control": round(sum(b) / len(b), 6),
                   "paired": paired(a, b)} for m, (a, b) in values.items()}
    changed = sum(normalize_text(a) != normalize_text(b) for a, b in zip(with_image, without)) / max(len(items), 1)
    return {"n": len(items), "changed": round(changed, 6), "metrics": metrics}


def verdict(image_reliance: dict) -> str | None:
    """The report's first line about image reliance (None when no control ran)."""
    blank = image_reliance.get("blank") or next(iter(image_reliance.values()), None)
    if not blank or not blank["metrics"]:
        return None
    metric = next((m for m in HEADLINE if m in blank["metrics"]), next(iter(blank["metrics"])))
    r = blank["metrics"][metric]
    control = "blank" if "blank" in image_reliance else next(iter(image_reliance))
    numbers = (f"{metric} {100 * r['with_image']:.2f} with the image, {100 * r['control']:.2f} with a {control} one "
               f"(p = {r['paired']['p']:.3g}, {r['paired']['test']}); {100 * blank['changed']:.0f}% of answers changed")
    if r["control"] >= r["with_image"] or not r["paired"]["significant"]:
        return f"**Warning: this model scores the same without the image** ({numbers}): its answers do not come from the image."
    return f"**The image matters**: {numbers}."
