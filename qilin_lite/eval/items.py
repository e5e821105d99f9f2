"""One benchmark question (or image to caption), whatever layout it came from, and the files an eval run writes.

The prompt shown for an item is prompt.py's; the layouts that make items are benchmarks.py's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, where
from .matching import LETTERS

TASKS = ("pmc-vqa", "vqa-rad", "slake", "pathvqa", "caption", "llava", "omnimedvqa", "mmmu")
KINDS = ("closed", "open", "choice", "caption", "short")  # short: one exact answer (MMMU's open questions)
PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
REPORT = "report.md"
DEFAULT_CAPTION_PROMPT = "请描述这张图片。"
# what a multiple-choice question is told after its options, by the language of the question
CHOICE_INSTRUCTIONS = {"zh": "请直接回答选项字母。", "en": "Answer with the option's letter from the given choices directly."}


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
    # a question with several images (MMMU): `image` is their composite, `parts` the images themselves in order;
    # a template that keeps images separate (huatuo, chatml) is shown the parts, each with its own tokens
    parts: tuple[str, ...] = ()

    def shown(self, template) -> list[str]:
        """The image files the model sees for this question under `template`'s multi-image rule."""
        if self.parts and template.separate_images:
            return list(self.parts[: template.max_images])
        return [self.image] if self.image else []

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "choice" and (not self.choices or self.reference not in LETTERS[: len(self.choices)]):
            raise ValueError(f"choice item {self.id} needs choices and a reference letter among them")


def scan_predictions(path: Path) -> tuple[list[tuple[int, dict]], int]:
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
