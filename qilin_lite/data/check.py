"""`qilin-lite data check`: a LLaVA file against what training needs, before any GPU time is spent.

In:  a LLaVA JSON/JSONL file (and its image folder; a model or run directory for lengths).
Out: a `CheckResult`: problems counted per kind, with `file:line (id): problem` examples.
The rules are the training ones, not copies: records.read_records for the record rules, processing.sample_lengths
for lengths, images.load_image (in threads) for decoding. Only what the input holds about a record (file, line, id,
image names) is reported, never its text: case reports describe patients.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, printable, where
from .records import Reject, read_records

# records.py / encoding.py reasons -> the problem kinds `check` counts
_PROBLEM_KINDS = (
    ("not valid JSON", "bad JSON"), ("not a JSON object", "bad JSON"),
    ("roles must alternate", "roles out of order"), ("no reply to learn from", "roles out of order"),
    ("no user/assistant turns", "roles out of order"),
    ("tag(s) but the record has", "image count mismatch"),
    ("not found", "missing image"), ("outside the image folder", "image outside the folder"),
    ("empty reply", "empty text"), ("empty question", "empty text"),
    ("duplicate id", "duplicate id"), ("the most a row may hold", "row too long"),
)


def _kind(reason: str) -> str:
    return next((kind for needle, kind in _PROBLEM_KINDS if needle in reason), "invalid record")


@dataclass
class CheckResult:
    records: int
    failed: int
    counts: dict[str, int]
    examples: dict[str, list[str]]
    seconds: float
    length_checked: bool

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def format(self) -> str:
        rate = self.records / self.seconds if self.seconds > 0 else float("inf")
        lines = [f"{self.records} records, {self.records - self.failed} ok, {self.failed} with problems "
                 f"({self.seconds:.1f} s, {rate:,.0f} records/s)"]
        for kind, n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            lines.append(f"{kind}: {n}")
            lines += [f"  {printable(e)}" for e in self.examples[kind]]  # image names are the data's, raw
        if not self.length_checked:
            lines.append("lengths not checked: pass --model (a Llava or run directory) to check them")
        return "\n".join(lines)


def model_facts(model: str | Path):
    """A model or run directory -> (tokenizer, image token id, tokens per image, run template, counts_of): at native
    resolution tokens per image is 0 and `counts_of(record)` gives each of its images' counts (else None)."""
    from transformers import AutoConfig

    from ..model import RunInfo, load_tokenizer_and_processor, num_image_tokens, resolve_base

    p = Path(model)
    info = RunInfo.load(p) if p.is_dir() else None
    config_dir = resolve_base(p, info) if info and info.kind in ("align", "lora", "qlora") else str(model)
    try:
        config = AutoConfig.from_pretrained(config_dir)
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{model}: cannot read the model config ({reason}); pass a Llava or run directory") from None
    tok, ip = load_tokenizer_and_processor(str(model))
    from ..images.pixel_values import image_loader, record_counts
    from ..model import image_mode_for

    counts_of = record_counts(image_loader(ip, image_mode_for(config, None, "pad")))
    return tok, config.image_token_id, num_image_tokens(config), info.template if info else None, counts_of


def check_data(
    path: str | Path,
    image_folder: str | Path | None = None,
    *,
    model: str | Path | None = None,
    max_length: int = 2048,
    template: str | None = None,
    examples: int = 5,
    decode: bool = True,
    workers: int | None = None,
    length_mode: str = "text",
    allow_outside_images: bool = False,
) -> CheckResult:
    """Every record against what training needs; the same rules as `align`/`tune` (records.py, encoding.py)."""
    from ..families import get_template
    from ..images.decode import load_image
    from ..encoding import TokenLayout, sample_lengths

    t0 = time.perf_counter()
    problems: list[tuple[int, str, str, str]] = []  # (order, kind, where, problem)
    rejects: list[Reject] = []
    try:
        records = read_records(path, image_folder, skip_bad=True, rejects=rejects,
                               allow_outside_images=allow_outside_images)
    except UserError:
        if not rejects:
            raise
        records = []  # every record was bad: report them all
    for r in rejects:
        problems.append((r.line or 0, _kind(r.reason), where(r.source, r.line, r.id), r.reason))
    failed = {(r.line, r.id) for r in rejects}

    def note(rec, kind: str, problem: str) -> None:
        problems.append((rec.line or 0, kind, rec.where, problem))
        failed.add((rec.line, rec.id))

    if decode:
        paths = sorted({p for rec in records for p in rec.images if isinstance(p, Path)})

        def decode_error(p: Path) -> str | None:
            try:
                load_image(p)
                return None
            except UserError as e:
                return str(e)

        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 2)) as pool:
            bad_images = {p: e for p, e in zip(paths, pool.map(decode_error, paths)) if e}
        for rec in records:
            for p in rec.images:
                if p in bad_images:
                    note(rec, "image does not decode", bad_images[p])
    if model is not None and records:
        tok, image_token_id, per_image, run_template, counts_of = model_facts(model)
        tpl = get_template(template or run_template or "vicuna_v1")
        # sample_lengths reports the length after truncation; an unbounded layout gives the full length to compare
        lengths, bad = sample_lengths(records, tpl, tok, TokenLayout(image_token_id, per_image, 1 << 40),
                                      counts_of=counts_of)
        for i, rec in enumerate(records):
            image_tokens = sum(counts_of(rec)) if counts_of and i not in bad else per_image * len(rec.images)
            # "text" (the authors' cut) counts an image as one id; "total" counts every position
            counted = lengths[i] - image_tokens + len(rec.images) if length_mode == "text" else lengths[i]
            if i in bad:
                note(rec, "cannot be encoded", bad[i])
            elif counted > max_length:
                unit = "text ids (images count one)" if length_mode == "text" else \
                    f"tokens ({image_tokens} of them image tokens)"
                note(rec, "too long", (
                    f"{counted} {unit} > max_length {max_length}; training would cut the text past it: "
                    "shorten the text or raise --max-length (qilin-lite data inspect shows where)"))
    counts: Counter = Counter()
    shown: dict[str, list[str]] = defaultdict(list)
    for _, kind, w, problem in sorted(problems, key=lambda p: p[0]):
        counts[kind] += 1
        if len(shown[kind]) < examples:
            shown[kind].append(f"{w}: {problem}")
    total = len(records) + len(rejects)
    return CheckResult(total, len(failed), dict(counts), dict(shown), time.perf_counter() - t0, model is not None)
