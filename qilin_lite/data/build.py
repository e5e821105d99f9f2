"""Raw ChiMed-VL-style sources -> LLaVA training files (`qilin-lite data build`).

`build`  In:  caption sources (PMC-OA `{image, caption}`, PMC-CaseReport `{PMC_id, img_ref, context, inline,
              question, answer}`), VQA sources (PMC-VQA CSV `Figure_path, Question, Answer, Choice A..D`), ChiMed-VL's
              own files (LLaVA conversations, or any layout named with field options); JSONL, JSON, CSV/TSV or Parquet.
         Out: OUT (JSONL or a JSON list) of `{"id", "image", "conversations", "source", "task"}` records whose image
              paths are relative to OUT's folder (so `align --data OUT` needs no --image-folder), composites in
              `<OUT stem>_images/`, every dropped record in `OUT.rejects.jsonl`, counts per step in `OUT.report.json`.
         Steps: read -> fields -> duplicate id -> >4 images -> missing image -> too short -> translate (opt-in)
              -> composite (worker processes) -> validate (records.validate_messages) -> write. The input is streamed
              in chunks; only the set of ids seen is held for the whole run.
         `images="separate"` skips the composite step: a record keeps its 2-N images as a list with one `<image>`
              each (HuatuoGPT-Vision's and LLaVA-OneVision's layout); a composite template (`vicuna_v1`, `plain`)
              still joins them when it trains, so one file serves both kinds of model.
The steps live beside this module: sources.py (reading, layouts), items.py (rows -> records),
translate.py; `check`, `stats` and `inspect` have their own modules.

Reports name only what the input itself holds about a record (file, line, id, image file names); no text is copied
into a reject or an error, because case reports describe patients.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import save_image_atomic, write_text_atomic
from .items import Drop, Item, conversation, image_count, row_to_item, source_text, too_short
from .records import BadRecord, Reject, messages_from_llava, validate_messages
from .rows import iter_rows
from .sources import FieldMap, detect_layout
from .translate import TranslateConfig, Translator, needs_translation

log = logging.getLogger(__name__)

def _make_composite(job: tuple[list[str], str]) -> str | None:
    """Load 2-4 images, composite them and write a PNG; returns the problem, or None. Runs in a worker process."""
    from ..images.decode import load_images

    paths, dest = job
    try:
        image = load_images(paths)
    except UserError as e:
        return str(e)
    save_image_atomic(image, dest)  # a killed run never leaves half a PNG under the final name
    return None


def composite_name(names: list[str]) -> str:
    """Deterministic file name of the composite of these images (same images, same name)."""
    return hashlib.sha1("\n".join(names).encode("utf-8")).hexdigest()[:20] + ".png"


STEPS = ("read", "fields", "duplicate", "too_many_images", "missing_image", "too_short", "translate", "composite",
         "validate")


@dataclass
class BuildConfig:
    task: str = "auto"  # auto | align (caption/context -> stage 1) | instruct (question/answer -> stage 2)
    layout: str = "auto"  # auto | llava | pmc-oa | pmc-casereport | pmc-vqa | fields
    fields: FieldMap = field(default_factory=FieldMap)
    text_kind: str | None = None  # caption | context; default: context when the text field is `context`
    source_name: str | None = None  # the records' `source` (default: the layout's dataset name, or the file name)
    out_format: str | None = None  # jsonl | json; default from OUT's suffix
    min_chars: int = 10  # captions/contexts shorter than this (in the input's language) are dropped
    min_question_chars: int = 4
    max_images: int = 4  # more images than this: dropped (a composite holds at most 4)
    images: str = "composite"  # composite (the paper: one image made of the item's 2-4) | separate (a list)
    seed: int = 0
    workers: int = 2  # composite worker processes; 0 = in this process
    chunk_size: int = 256  # records per translate/composite round: bounds memory
    limit: int | None = None  # stop after this many input rows (a quick trial)
    translate: TranslateConfig | None = None

    def __post_init__(self):
        if self.task not in ("auto", "align", "instruct"):
            raise UserError(f"--task must be auto, align or instruct, not '{self.task}'")
        if self.text_kind not in (None, "caption", "context"):
            raise UserError(f"--text-kind must be caption or context, not '{self.text_kind}'")
        if self.out_format not in (None, "jsonl", "json"):
            raise UserError(f"--format must be jsonl or json, not '{self.out_format}'")
        if self.images not in ("composite", "separate"):
            raise UserError(f"--images must be composite or separate, not '{self.images}'")
        if self.max_images < 1 or (self.images == "composite" and self.max_images > 4):
            raise UserError(f"--max-images must be 1 to 4 (a composite holds at most 4; --images separate takes "
                            f"more), not {self.max_images}")
        if self.workers < 0 or self.chunk_size < 1 or self.min_chars < 0:
            raise UserError("--workers and --min-chars must be >= 0")


def discard(f, path: Path) -> None:
    """Close `f` and remove its file; closing flushes, which fails again on a full disk, and must not stop this."""
    with contextlib.suppress(OSError):
        f.close()
    path.unlink(missing_ok=True)


class _Writer:
    """OUT as JSONL or a JSON list, written to OUT.tmp and renamed at the end, so a failed run leaves no
    complete-looking file."""

    def __init__(self, out: Path, fmt: str):
        self.out, self.fmt, self.n = out, fmt, 0
        self.tmp = out.with_name(out.name + ".tmp")
        self.f = self.tmp.open("w", encoding="utf-8")
        if fmt == "json":
            self.f.write("[")

    def write(self, rec: dict) -> None:
        text = json.dumps(rec, ensure_ascii=False)
        if self.fmt == "json":
            self.f.write(("," if self.n else "") + "\n" + text)
        else:
            self.f.write(text + "\n")
        self.n += 1

    def close(self, ok: bool) -> None:
        if ok:
            if self.fmt == "json":
                self.f.write("\n]\n")
            self.f.close()
            os.replace(self.tmp, self.out)
        else:
            discard(self.f, self.tmp)


def build(
    inputs: list[str | Path],
    out: str | Path,
    image_folders: list[str | Path] | None = None,
    cfg: BuildConfig | None = None,
) -> dict:
    """Build OUT from the inputs; returns the report (also written to OUT.report.json).

    `image_folders`: one folder for all inputs, or one per input; default: each input's own folder.
    """
    cfg = cfg or BuildConfig()
    out = Path(out)
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise UserError("data build needs at least one input file")
    folders = [Path(f) for f in image_folders or []]
    if len(folders) not in (0, 1, len(inputs)):
        raise UserError(f"give --image-folder once, or once per input ({len(inputs)}), not {len(folders)} times")
    folders = folders * len(inputs) if len(folders) == 1 else folders or [p.parent for p in inputs]
    for f in folders:
        if not f.is_dir():
            raise UserError(f"{f}: image folder not found; pass --image-folder with the folder holding the images")
    if any(out.resolve() == p.resolve() for p in inputs):
        raise UserError(f"{out}: --out names an input file; write the output somewhere else")
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = cfg.out_format or ("json" if out.suffix.lower() == ".json" else "jsonl")
    translator = None
    if cfg.translate:
        translator = Translator(cfg.translate, cfg.translate.cache or out.with_suffix(".translations.sqlite"))
    t0 = time.perf_counter()
    state = _BuildState(cfg, out, fmt, translator)
    report_path, reported = out.with_suffix(".report.json"), False
    try:
        for path, folder in zip(inputs, folders):
            state.run_input(path, folder)
        state.flush()
        report = state.report()
        # the report first, the output last: whatever a full disk stops, no output stands without its report
        write_text_atomic(report_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        reported = True
        state.finish(ok=True)
    except BaseException:
        state.finish(ok=False)
        if reported:  # this run's report describes an output that did not get written
            report_path.unlink(missing_ok=True)
        raise
    log.info("data build: %d records in %.1f s", report["written"], time.perf_counter() - t0)
    return report


class _BuildState:
    """One build run: the steps per row and per chunk, the open output and rejects files, the counts."""

    def __init__(self, cfg: BuildConfig, out: Path, fmt: str, translator: Translator | None):
        self.cfg, self.out, self.fmt, self.translator = cfg, out, fmt, translator
        self.image_dir = out.parent / f"{out.stem}_images"
        self.seen: set[str] = set()
        self.dropped: Counter = Counter()
        self.rows = self.missing_files = self.composites = 0
        self.inputs: list[dict] = []
        self.chunk: list[Item] = []
        self.pool: ProcessPoolExecutor | None = None
        self.writer = _Writer(out, fmt)
        self.rejects_path = out.with_suffix(".rejects.jsonl")
        self.rejects_tmp = self.rejects_path.with_name(self.rejects_path.name + ".tmp")
        self.rejects = self.rejects_tmp.open("w", encoding="utf-8")

    def finish(self, ok: bool) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        if self.translator:
            self.translator.close()
        if not ok:
            self.writer.close(ok)
            discard(self.rejects, self.rejects_tmp)
            return
        self.rejects.close()  # before the output appears: a full disk here still leaves no output
        self.writer.close(ok)
        os.replace(self.rejects_tmp, self.rejects_path)

    def reject(self, file: str, line: int | None, rid: str | None, step: str, reason: str) -> None:
        self.dropped[step] += 1
        row = dict(Reject(file, line, rid, reason).to_json(), step=step)
        self.rejects.write(json.dumps(row, ensure_ascii=False) + "\n")

    def run_input(self, path: Path, folder: Path) -> None:
        layout, n = None, 0
        # plain string paths: pathlib's resolve() per image costs more than the rest of a row's work
        folder_abs = os.path.abspath(folder)
        rel_prefix = os.path.relpath(folder_abs, os.path.abspath(self.out.parent))
        info = {"path": str(path), "image_folder": str(folder), "rows": 0}
        self.inputs.append(info)
        for line, row, error in iter_rows(path):
            if self.cfg.limit is not None and self.rows >= self.cfg.limit:
                break
            self.rows += 1
            n += 1
            info["rows"] = n
            rid = str(row["id"]) if isinstance(row, dict) and row.get("id") not in (None, "") else None
            if error:
                self.reject(str(path), line, rid, "read", error)
                continue
            if layout is None:
                c = self.cfg
                layout = detect_layout(row, c.layout, c.fields, c.task, c.text_kind, path)
                info.update(layout=layout.name, task=layout.task, fields=layout.keys)
            try:
                item = row_to_item(row, layout, line, str(path), self.cfg.source_name)
                self.check(item, folder_abs, rel_prefix)
            except Drop as d:
                self.reject(str(path), line, d.rid or rid, d.step, str(d))
                continue
            self.chunk.append(item)
            if len(self.chunk) >= self.cfg.chunk_size:
                self.flush()

    def check(self, item: Item, folder: str, rel_prefix: str) -> None:
        """The cheap per-row steps, in report order; raises Drop."""
        def drop(step: str, reason: str) -> Drop:
            return Drop(step, reason, item.id)

        if item.id in self.seen:
            raise drop("duplicate", f"duplicate id '{item.id}' (the first record with this id is kept)")
        self.seen.add(item.id)
        if len(item.names) > self.cfg.max_images:
            raise drop("too_many_images", f"{len(item.names)} images, more than --max-images {self.cfg.max_images}")
        missing = []
        for name in item.names:
            # records often carry a folder prefix that the downloaded images do not have: try the bare name too
            for candidate in dict.fromkeys((name, os.path.basename(name))):
                p = os.path.join(folder, candidate)
                if os.path.isfile(p):
                    item.paths.append(p)
                    item.rel.append(os.path.normpath(os.path.join(rel_prefix, candidate)).replace(os.sep, "/"))
                    break
            else:
                missing.append(name)
        if missing:
            self.missing_files += len(missing)
            raise drop("missing_image", f"image(s) not found in {folder}: {', '.join(missing)}")
        short = too_short(item, self.cfg.min_chars, self.cfg.min_question_chars)
        if short:
            raise drop("too_short", short)

    def flush(self) -> None:
        chunk, self.chunk = self.chunk, []
        if not chunk:
            return
        if self.translator:
            chunk = self.translate(chunk)
        chunk = self.composite(chunk)
        for item in chunk:
            rec = self.record(item)
            if rec is not None:
                self.writer.write(rec)

    def translate(self, chunk: list[Item]) -> list[Item]:
        texts = [t for it in chunk for t in it.texts.values() if t and needs_translation(t)]
        done = self.translator.translate(texts)
        kept = []
        for it in chunk:
            bad = [k for k, t in it.texts.items() if t in done and not done[t]]
            if bad:
                reason = f"untranslatable: empty translation of {', '.join(bad)}"
                self.reject(it.file, it.line, it.id, "translate", reason)
                continue
            for k, t in list(it.texts.items()):
                if t in done:
                    it.source_text[k] = t
                    it.texts[k] = done[t]
            kept.append(it)
        return kept

    def composite(self, chunk: list[Item]) -> list[Item]:
        jobs: dict[str, list[str]] = {}
        for it in chunk:
            if self.cfg.images == "separate" and len(it.paths) > 1:
                it.image = list(it.rel)
            elif len(it.paths) == 1:
                it.image = it.rel[0]
            elif it.paths:
                name = composite_name(it.rel)
                it.image = f"{self.image_dir.name}/{name}"
                jobs.setdefault(name, it.paths)
        if not jobs:
            return chunk
        self.image_dir.mkdir(parents=True, exist_ok=True)
        work = [(paths, str(self.image_dir / name)) for name, paths in jobs.items()]
        if self.cfg.workers > 0:
            if self.pool is None:
                import multiprocessing

                # spawn: workers never inherit this process's threads, sqlite handle or open files
                ctx = multiprocessing.get_context("spawn")
                self.pool = ProcessPoolExecutor(max_workers=self.cfg.workers, mp_context=ctx)
            problems = dict(zip(jobs, self.pool.map(_make_composite, work)))
        else:
            problems = dict(zip(jobs, map(_make_composite, work)))
        self.composites += sum(p is None for p in problems.values())
        kept = []
        for it in chunk:
            problem = problems.get(Path(it.image).name) if isinstance(it.image, str) and len(it.paths) > 1 else None
            if problem:
                self.reject(it.file, it.line, it.id, "composite", f"cannot composite the images: {problem}")
            else:
                kept.append(it)
        return kept

    def record(self, item: Item) -> dict | None:
        turns = conversation(item, self.cfg.seed)
        try:
            validate_messages(messages_from_llava(turns), image_count(item))
        except BadRecord as e:
            self.reject(item.file, item.line, item.id, "validate", str(e))
            return None
        rec: dict[str, Any] = {"id": item.id}
        if item.image:
            rec["image"] = item.image
        rec.update(conversations=turns, source=item.source, task=item.task)
        if item.source_text:
            rec["source_text"] = source_text(item)
        return rec

    def report(self) -> dict:
        steps, remaining = [], self.rows
        for step in STEPS:
            if step == "translate" and self.translator is None:
                continue
            remaining -= self.dropped[step]
            steps.append({"step": step, "dropped": self.dropped[step], "kept": remaining})
        rep = {
            "output": self.out.name, "format": self.fmt, "images_relative_to": "the output's folder",
            "images": self.cfg.images, "composite_folder": self.image_dir.name, "seed": self.cfg.seed,
            "inputs": self.inputs, "rows": self.rows, "steps": steps, "written": self.writer.n,
            "composites": self.composites, "missing_image_files": self.missing_files,
            "rejects": self.rejects_path.name,
        }
        if self.translator:
            rep["translation"] = {"model": self.translator.cfg.model, **dict(sorted(self.translator.stats.items()))}
        return rep


def format_build_report(rep: dict, out: str | Path | None = None) -> str:
    lines = []
    for inp in rep["inputs"]:
        lines.append(f"read {inp['rows']} rows from {inp['path']} "
                     f"(layout {inp.get('layout', '?')}, task {inp.get('task', '?')})")
    for s in rep["steps"]:
        if s["step"] != "read" or s["dropped"]:
            lines.append(f"  {s['step']:<16} dropped {s['dropped']:>8}   kept {s['kept']:>8}")
    lines.append(f"composites made: {rep['composites']}; missing image files: {rep['missing_image_files']}")
    if "translation" in rep:
        t = rep["translation"]
        lines.append(f"translation: {t.get('requested', 0)} texts requested in {t.get('requests', 0)} requests "
                     f"({t.get('retries', 0)} retries), {t.get('cached', 0)} from the cache")
    out = Path(out) if out else Path(rep["output"])
    lines.append(f"wrote {rep['written']} records to {out} (image paths relative to its folder); "
                 f"dropped records listed in {out.with_suffix('.rejects.jsonl')}")
    return "\n".join(lines)
