"""Raw rows -> validated `Record`s.

In:  LLaVA-format JSON (a list) or JSONL files (`{"id", "image", "conversations": [{"from", "value"}, ...]}`) with an
     image folder, or a Hugging Face dataset (hub name or local path) with an image column and a messages column.
Out: `Record(id, messages, images, source, line)`; messages use roles user/assistant/system and keep `<image>`
     placeholders in user text; images are paths (or lazy dataset cells), never decoded here.

Every problem is reported as `file:line (id): problem; fix`. With `skip_bad` the record is set aside as a `Reject`
instead, so one bad row never ends a run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..families import IMAGE_TOKEN, check_roles
from ..errors import UserError, where
from .rows import iter_json

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class LazyImage:
    """An image cell of a Hugging Face dataset, decoded only when a batch needs it."""

    dataset: Any
    index: int
    column: str
    item: int | None = None  # which image of a list-of-images cell

    def open(self):
        cell = self.dataset[self.index][self.column]
        return cell if self.item is None else cell[self.item]


@dataclass
class Record:
    id: str
    messages: list[dict]
    images: list[Path | LazyImage] = field(default_factory=list)
    source: str = ""
    line: int | None = None

    @property
    def where(self) -> str:
        return where(self.source, self.line, self.id)


@dataclass
class Reject:
    source: str
    line: int | None
    id: str | None
    reason: str

    def to_json(self) -> dict:
        return {"source": self.source, "line": self.line, "id": self.id, "reason": self.reason}


class BadRecord(ValueError):
    """A record that cannot be trained on; the message says why and what to do."""


def read_records(
    path: str | Path,
    image_folder: str | Path | None = None,
    *,
    skip_bad: bool = False,
    rejects: list[Reject] | None = None,
    split: str = "train",
    image_column: str = "image",
    messages_column: str | None = None,
    allow_outside_images: bool = False,
) -> list[Record]:
    """Read and validate every record; raise UserError on the first bad one unless `skip_bad`. With an
    `image_folder`, an image name that leads outside it (`../`, an absolute path) is that record's problem unless
    `allow_outside_images` (data that names absolute paths on purpose). Without one, names are relative to the data
    file and may climb out of its folder: `data build` writes such paths when the images live beside its output."""
    rejects = rejects if rejects is not None else []
    p = Path(path)
    if is_data_file(p):
        if not p.exists():
            raise UserError(f"{p}: data file not found; check the path given to --data")
        rows = iter_json(p, on_broken="raise")
        folder = Path(image_folder) if image_folder else p.parent
        if not folder.is_dir():
            raise UserError(f"{folder}: image folder not found; pass --image-folder with the folder holding the images")
        # a record without an id (LLaMA-Factory, ms-swift and trl files have none) is named by its file and line
        contain = image_folder is not None and not allow_outside_images
        convert = lambda row, line: _from_llava(row, folder, f"{p.name}:{line}", not contain)  # noqa: E731
    else:
        rows, convert = _iter_hf_rows(str(path), split, image_column, messages_column)
    out: list[Record] = []
    seen: set[str] = set()
    for line, row, error in rows:
        rid = str(row.get("id")) if isinstance(row, dict) and row.get("id") is not None else None
        try:
            if error:
                raise BadRecord(error)
            rec = convert(row, line)
            rec.source, rec.line = str(path), line
            if rec.id in seen:
                raise BadRecord(f"duplicate id '{rec.id}'; ids must be unique (deduplicate the file)")
            seen.add(rec.id)
            out.append(rec)
        except BadRecord as e:
            if not skip_bad:
                raise UserError(f"{where(path, line, rid)}: {e} (or pass --skip-bad to set such records aside)") from None
            rejects.append(Reject(str(path), line, rid, str(e)))
    if not out:
        raise UserError(f"{path}: no usable records" + (f" ({len(rejects)} rejected, see rejects.jsonl)" if rejects else ""))
    return out


def is_data_file(path: str | Path) -> bool:
    """A LLaVA / ShareGPT JSON or JSONL file (anything else is a Hugging Face dataset folder or name)."""
    p = Path(path)
    return p.suffix in (".json", ".jsonl") or p.is_file()


def messages_from_llava(convs: Any) -> list[dict]:
    """LLaVA / ShareGPT turns (`from`/`value` or `role`/`content`, HF content lists) -> messages with the roles
    user / assistant / system. The one turn parser: training, `data check` and `eval` read turns through it."""
    if not isinstance(convs, list) or not convs:
        raise BadRecord("'conversations' must be a non-empty list of {from, value} turns")
    messages = []
    for i, turn in enumerate(convs, 1):
        if not isinstance(turn, dict):
            raise BadRecord(f"turn {i} is not an object")
        role = ROLE_NAMES.get(str(turn.get("from", turn.get("role", ""))).lower())
        content = turn.get("value", turn.get("content"))
        if role is None:
            raise BadRecord(f"turn {i} has unknown role '{turn.get('from', turn.get('role'))}' (use human/gpt)")
        messages.append({"role": role, "content": _content_text(content, i)})
    return messages


def _content_text(content: Any, turn: int) -> str:
    # trl / HF chat format: [{"type": "image"}, {"type": "text", "text": ...}] -> "<image>\n..." as LLaVA writes it
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") == "image":
                parts.append(IMAGE_TOKEN + "\n")
            elif isinstance(p, dict) and p.get("type") == "text":
                parts.append(str(p.get("text", "")))
        return "".join(parts).rstrip("\n") if parts and parts[-1] == IMAGE_TOKEN + "\n" else "".join(parts)
    if not isinstance(content, str):
        raise BadRecord(f"turn {turn} text is not a string")
    return content


def validate_messages(messages: list[dict], n_images: int) -> None:
    try:
        check_roles(messages)
    except ValueError as e:
        raise BadRecord(str(e)) from None
    for i, m in enumerate(messages, 1):
        if m["role"] == "assistant":
            if not m["content"].strip():
                raise BadRecord(f"turn {i} is an empty reply; remove the turn or fill in the answer")
            if IMAGE_TOKEN in m["content"]:
                raise BadRecord(f"turn {i}: '{IMAGE_TOKEN}' inside a reply; images belong in user turns")
        elif m["role"] == "user" and not m["content"].strip():
            # only an image may stand alone (a caption prompt); an empty later question renders `USER:ASSISTANT:`,
            # and the authors' code masks such a record whole, so it never teaches anything
            raise BadRecord(f"turn {i} is an empty question; remove the turn or fill in the question")
        elif m["role"] == "user" and not m["content"].replace(IMAGE_TOKEN, "").strip() and n_images == 0:
            raise BadRecord(f"turn {i} is an empty question")
    tags = sum(m["content"].count(IMAGE_TOKEN) for m in messages if m["role"] == "user")
    if tags != n_images:
        raise BadRecord(
            f"text has {tags} '{IMAGE_TOKEN}' tag(s) but the record has {n_images} image(s); "
            f"put one '{IMAGE_TOKEN}' in the user text per image"
        )


def _from_llava(row: dict, folder: Path, default_id: str, allow_outside_images: bool = False) -> Record:
    """LLaVA (`conversations` of from/value) or ShareGPT / OpenAI (`messages` of role/content, text or trl's typed
    parts) with `image` or `images`; the id is optional."""
    rid = row.get("id")
    if rid is None:
        rid = default_id
    messages = messages_from_llava(row.get("conversations", row.get("messages")))
    image = row.get("image", row.get("images"))
    names = [] if image in (None, "", []) else image if isinstance(image, list) else [image]
    if not all(isinstance(n, str) and n for n in names):
        raise BadRecord("'image' must be a file name or a list of file names")
    validate_messages(messages, len(names))
    paths = []
    for n in names:
        path = folder / n
        # judged on the names, not on links: a folder of symlinks the user made stays usable
        if not allow_outside_images and not _inside(path, folder):
            raise BadRecord(f"image '{n[:120]}' is outside the image folder {folder}; give names relative to "
                            "--image-folder, or allow such paths with --set data.allow_outside_images=true "
                            "(data check: --allow-outside-images)")
        try:
            found = path.is_file()
        except OSError as e:  # a name longer than the file system allows, a path through a file, ...: this record's
            raise BadRecord(f"image '{n[:120]}' cannot be looked up ({e.strerror or type(e).__name__}); "
                            "fix the record's 'image' field") from None
        if not found:
            raise BadRecord(f"image '{path}' not found; check --image-folder or the record's 'image' field")
        paths.append(path)
    return Record(id=str(rid), messages=messages, images=paths)


def _inside(path: Path, folder: Path) -> bool:
    return os.path.normpath(os.path.abspath(path)).startswith(os.path.normpath(os.path.abspath(folder)) + os.sep)


def open_hf_dataset(name: str, split: str):
    """A local `save_to_disk` folder or a hub dataset (memory-mapped Arrow: opening it reads no rows)."""
    import datasets

    try:
        if Path(name).is_dir() and any((Path(name) / f).exists() for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(name)
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(name, split=split)
    except FileNotFoundError as e:
        raise UserError(f"{name}: no such data file or dataset ({e}); pass a .json/.jsonl file or a dataset path") from None


def _iter_hf_rows(name: str, split: str, image_column: str, messages_column: str | None):
    ds = open_hf_dataset(name, split)
    cols = ds.column_names
    mcol = messages_column or next((c for c in ("messages", "conversations") if c in cols), None)
    if mcol is None:
        raise UserError(f"{name}: no 'messages' or 'conversations' column (columns: {cols}); name it with messages_column")
    if image_column not in cols and image_column == "image" and "images" in cols:
        image_column = "images"  # trl's and LLaMA-Factory's name for a list of images
    counts = _image_counts(ds, image_column) if image_column in cols else None
    text_only = ds.remove_columns([c for c in cols if c == image_column])  # rows without decoding images

    def rows():
        for i, row in enumerate(text_only):
            yield i + 1, dict(row, __index__=i), None

    def convert(row: dict, line: int) -> Record:
        messages = messages_from_llava(row[mcol])
        tags = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
        i = row["__index__"]
        if counts is None or not tags:
            images = []
        elif counts[i] is None:  # one image per cell: attach it when the text asks for one, decode it per batch
            images = [LazyImage(ds, i, image_column)]
        else:  # a list of images per cell
            images = [LazyImage(ds, i, image_column, k) for k in range(counts[i])]
        validate_messages(messages, len(images))
        return Record(id=str(row.get("id", i)), messages=messages, images=images)

    return rows(), convert


def _image_counts(ds, column: str) -> list[int | None]:
    """Per row: None for a single-image cell, else how many images its list holds, read from Arrow without
    decoding a single image."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = ds.with_format("arrow")[column]
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        return [None] * len(ds)
    return [0 if n is None else int(n) for n in pc.list_value_length(arr).to_pylist()]


def write_rejects(rejects: list[Reject], out_dir: Path) -> Path | None:
    if not rejects:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "rejects.jsonl"
    with path.open("a", encoding="utf-8") as f:
        for r in rejects:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    return path
