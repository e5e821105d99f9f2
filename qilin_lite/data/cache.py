"""Checked records -> an on-disk record index every process shares, and the caches that let a restart skip the checks.

In:  the records `train.build_dataset` accepted, their token lengths, and the identity of what they came from.
Out: `RecordIndex`: `len()` and `[i] -> Record`, backed by `OUT/.qilin-data/KEY/records.jsonl` plus two int64 arrays
     (byte offsets, token lengths). A process holds 16 bytes a record, and DataLoader workers inherit the arrays
     without copying them (Python objects would be copied page by page as their reference counts change: about
     5 KB a record across 4 workers before; `benchmarks/dataset_scale.py` measures it).
     `ImageVerdicts`: image path -> (size, mtime, problem) for every image decoded, so a rerun decodes only new or
     changed files.

KEY digests the data file's identity (path, size, modification time), the image folder, the tokenizer, the template,
the length settings and the qilin-lite version; the images' own identities are checked (one stat each) on reuse.
So `--resume`, or a second run on the same data into the same output directory, starts in seconds instead of
decoding every image and tokenizing every record again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from .records import LazyImage, Record

log = logging.getLogger(__name__)

CACHE_DIR = ".qilin-data"
FORMAT = 1  # bump when the stored layout or the encoding rules change


def file_identity(path: str | Path) -> list:
    """(resolved path, size, mtime) of a file, or of every file under a directory (HF `save_to_disk`); a hub name is
    itself (the hub's own revision caching decides what it serves)."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    if p.is_dir():
        out = []
        for f in sorted(p.rglob("*")):
            if f.is_file():
                st = f.stat()
                out.append([str(f.relative_to(p)), st.st_size, st.st_mtime_ns])
        return [str(p.resolve()), out]
    return [str(path)]


def tokenizer_identity(tokenizer) -> str:
    """A digest of what decides token ids: the SentencePiece model and legacy flag, or the fast tokenizer's JSON."""
    from ..tokens import slow_llama

    h = hashlib.sha256()
    sp = slow_llama(tokenizer)
    if sp is not None:
        h.update(sp.model_proto)
        h.update(json.dumps([sp.legacy, sorted(sp.special.items()), sp.add_bos, sp.add_eos]).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    return h.hexdigest()


def data_key(parts: dict) -> str:
    from .. import __version__

    blob = json.dumps({**parts, "qilin_lite": __version__, "format": FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def _image_ref(ref) -> object:
    if isinstance(ref, LazyImage):
        return {"row": ref.index, "column": ref.column, "item": ref.item}
    return str(ref)


class RecordIndex:
    """Records on disk, addressed by byte offset; each process opens the file itself on first use."""

    def __init__(self, directory: Path, offsets: np.ndarray, lengths: np.ndarray, meta: dict, dataset=None):
        self.directory, self.offsets, self.lengths, self.meta = Path(directory), offsets, lengths, meta
        self.dataset = dataset  # the HF dataset LazyImage cells point into (memory-mapped Arrow), if any
        self._fh = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> Record:
        if self._fh is None or self._pid != os.getpid():  # a forked worker opens its own handle
            self._fh = open(self.directory / "records.jsonl", "rb")  # noqa: SIM115 - lives as long as the index
            self._pid = os.getpid()
        self._fh.seek(int(self.offsets[i]))
        row = json.loads(self._fh.readline())
        images = [Path(r) if isinstance(r, str) else LazyImage(self.dataset, r["row"], r["column"], r["item"])
                  for r in row["images"]]
        return Record(row["id"], row["messages"], images, row["source"], row["line"])

    def __getstate__(self):  # spawned workers: the arrays and the path travel, never an open file
        return {**self.__dict__, "_fh": None, "_pid": None}

    @staticmethod
    def write(directory: Path, records: list[Record], lengths: np.ndarray, meta: dict) -> None:
        """Write atomically: into a temporary directory renamed into place once complete."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        offsets = np.zeros(len(records), dtype=np.int64)
        images: dict[str, None] = {}
        with open(tmp / "records.jsonl", "wb") as f:
            for i, rec in enumerate(records):
                offsets[i] = f.tell()
                refs = [_image_ref(r) for r in rec.images]
                images.update((r, None) for r in refs if isinstance(r, str))
                f.write(json.dumps({"id": rec.id, "messages": rec.messages, "images": refs, "source": rec.source,
                                    "line": rec.line}, ensure_ascii=False).encode("utf-8") + b"\n")
        paths = list(images)
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "lengths.npy", np.asarray(lengths, dtype=np.int64))
        np.save(tmp / "image_stats.npy", _stats(paths))
        (tmp / "images.json").write_text(json.dumps(paths, ensure_ascii=False), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
        if directory.exists():
            import shutil

            shutil.rmtree(directory)
        tmp.rename(directory)

    @staticmethod
    def load(directory: Path, dataset=None) -> "RecordIndex | None":
        """The index, or None when it is missing, incomplete, or an image changed since it was written."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
            offsets = np.load(directory / "offsets.npy")
            lengths = np.load(directory / "lengths.npy")
            paths = json.loads((directory / "images.json").read_text(encoding="utf-8"))
            stats = np.load(directory / "image_stats.npy")
        except (OSError, ValueError):
            return None
        if len(offsets) != len(lengths) or len(paths) != len(stats):
            return None
        now = _stats(paths)
        changed = np.flatnonzero((now != stats).any(axis=1))
        if len(changed):
            log.info("%d image(s) changed since the data was checked (first: %s); checking again",
                     len(changed), paths[int(changed[0])])
            return None
        return RecordIndex(directory, offsets, lengths, meta, dataset)


def _stats(paths: list[str]) -> np.ndarray:
    out = np.full((len(paths), 2), -1, dtype=np.int64)
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
            out[i] = (st.st_size, st.st_mtime_ns)
        except OSError:
            pass
    return out


class ImageVerdicts:
    """What decoding each image found (None: fine), valid while its size and modification time are unchanged."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, list] = {}
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.entries = {}

    def known(self, path: Path) -> tuple[bool, str | None]:
        """(whether a verdict for this exact file is cached, the problem it found)."""
        e = self.entries.get(str(path))
        if e is None:
            return False, None
        try:
            st = os.stat(path)
        except OSError:
            return False, None
        return (st.st_size == e[0] and st.st_mtime_ns == e[1]), e[2]

    def record(self, path: Path, problem: str | None) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        self.entries[str(path)] = [st.st_size, st.st_mtime_ns, problem]

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.entries, ensure_ascii=False), encoding="utf-8")
        tmp.replace(self.path)
