"""The one reader of row files: (line or position, row, parse error) for every row, streamed, never the whole file.

Used by training (records.py), `data build` / `data stats` (sources.py) and `eval` (eval/records.py), so a
file reads the same everywhere. JSONL: one row per non-blank line, a bad line names itself and the rest go on. A
JSON list: its elements one at a time, numbered by position; a broken element (or more text after the list, as in a
JSONL file whose first line is a list) ends it, since no JSON parser can find the next element after one, and the
caller decides whether that is a rejected row (`data build`, which reports it) or the file's error
(`on_broken="raise"`). CSV/TSV and Parquet (`iter_rows` only) give dicts.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from ..errors import UserError, where

Row = tuple[int, Any, "str | None"]
BOM_AND_SPACE = b"\xef\xbb\xbf \t\r\n"


def is_json_list(path: Path) -> bool:
    """Does the file start (after a byte-order mark and white space) with a JSON list?"""
    with Path(path).open("rb") as f:
        return f.read(4096).lstrip(BOM_AND_SPACE).startswith(b"[")


# The longest row read, in characters (a JSONL line, a JSON list element). A record is a few kB of text and image
# names; without a bound one 2 GB line was read whole and parsed (45 s, 5.9 GB of memory) before anything was said.
# Read at each call, so a test may lower it.
MAX_ROW_CHARS = 64 << 20


def too_long(limit: int) -> str:
    return (f"longer than {limit:,} characters, the most a row may hold (a record is a few kB: text and image "
            "names, never image data); split the file into one record per line or take out what is embedded")


NESTED = "not a record (JSON nested deeper than Python's parser allows); a record is an object a few levels deep"


def iter_json(path: Path, *, on_broken: str = "yield") -> Iterator[Row]:
    """Rows of a JSONL file or a JSON list. A broken JSON list yields its error as a row (`on_broken="yield"`) or
    raises one UserError naming the line where reading stopped (`"raise"`)."""
    path = Path(path)
    yield from _iter_json_list(path, on_broken) if is_json_list(path) else iter_jsonl(path)


def iter_rows(path: Path) -> Iterator[Row]:
    """Yield (line or position, row, parse error) without loading the file: JSONL, JSON list, CSV/TSV, Parquet."""
    if not path.is_file():
        raise UserError(f"{path}: input file not found; check the path")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        yield from _iter_csv(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        yield from iter_json(path)


def iter_jsonl(path: Path) -> Iterator[Row]:
    """Yield (line, row or None, parse_error) for each non-blank line, streaming: one bad line names itself, and a
    line past `MAX_ROW_CHARS` is refused as it is read, without holding it whole."""
    limit = MAX_ROW_CHARS
    with Path(path).open(encoding="utf-8-sig", errors="replace") as f:
        i = 0
        while raw := f.readline(limit + 1):
            i += 1
            if len(raw) > limit and not raw.endswith("\n"):
                while (rest := f.readline(1 << 16)) and not rest.endswith("\n"):
                    pass  # the rest of the line, read in pieces and dropped
                yield i, None, too_long(limit)
                continue
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                yield i, None, f"not valid JSON ({e.msg})"
                continue
            except RecursionError:  # a hostile or broken file: arrays or objects nested thousands deep
                yield i, None, NESTED
                continue
            yield i, row, None if isinstance(row, dict) else "line is not a JSON object"


def _iter_json_list(path: Path, on_broken: str, chunk: int = 1 << 20) -> Iterator[Row]:
    """Elements of a top-level JSON list, decoded one at a time from a sliding buffer (1-based positions)."""
    decoder = json.JSONDecoder()
    limit = MAX_ROW_CHARS
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        buf, pos, eof, lines_before = "", 0, False, 0  # lines_before: newlines in text already dropped from buf

        def more() -> bool:
            nonlocal buf, pos, eof, lines_before
            data = f.read(chunk)
            eof = not data
            lines_before += buf.count("\n", 0, pos)
            buf, pos = buf[pos:] + data, 0
            return bool(data)

        def skip_space() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not more():
                    return buf[pos] if pos < len(buf) else ""

        def broken(n: int, problem: str, at: int) -> Row:
            line = lines_before + buf.count("\n", 0, at) + 1
            if on_broken == "raise":
                raise UserError(f"{where(path, line)}: {problem}; fix the file or convert it to JSONL")
            # a JSON list cannot be resynchronised after a broken element: say that reading stopped
            return n, None, f"{problem}; the records after it were not read: fix it or use JSONL"

        more()
        if skip_space() != "[":
            yield 1, None, "not a JSON list"
            return
        pos += 1
        n = 0
        while True:
            c = skip_space()
            if c == "]":
                pos += 1
                if skip_space():  # text after the list: a JSONL file whose first line is a list, or two lists
                    yield broken(n + 1, "not valid JSON (more text after the list)", pos)
                return
            if n:
                if c != ",":
                    yield broken(n + 1, "not valid JSON (expected ',' between records)", pos)
                    return
                pos += 1
                skip_space()
            while True:
                try:
                    row, end = decoder.raw_decode(buf, pos)
                    if end == len(buf) and not eof:
                        raise json.JSONDecodeError("incomplete", buf, end)  # the value may go on in the next chunk
                    break
                except json.JSONDecodeError as e:
                    if len(buf) - pos > limit:  # no record is that large: too long, or broken early on
                        yield broken(n + 1, f"no complete record within {limit:,} characters, the most a row may "
                                     "hold (a record is a few kB)", pos)
                        return
                    if not more():
                        yield broken(n + 1, f"not valid JSON ({e.msg})", e.pos)
                        return
                except RecursionError:
                    yield broken(n + 1, NESTED, pos)
                    return
            n += 1
            pos = end
            yield n, row, None if isinstance(row, dict) else "record is not a JSON object"


def _iter_csv(path: Path, delimiter: str) -> Iterator[Row]:
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            yield reader.line_num, {k: v for k, v in row.items() if k is not None}, None


def _iter_parquet(path: Path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs `pip install pyarrow`, or convert it to JSONL") from None
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield n, row, None
