"""Guards on a training output directory: one run trains into it at a time, a finished model or a folder of the
user's is never replaced silently, and `--resume` never goes on with other data or settings than the run recorded.

In:  the recipe about to train, the output directory, and the user's --resume / --overwrite.
Out: the directory, claimed by this process (`claim`, until `release`) and ready (created, or emptied on
--overwrite), with `recipe.yaml` and `.qilin-run.json` (what the inputs were: a digest of each data file) written;
or a UserError naming what is in the way and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path

from ..config import Recipe, load_recipe, save_recipe
from ..distributed import rank
from ..errors import UserError
from ..files import write_text_atomic

try:
    import fcntl
except ImportError:  # not a POSIX system: runs are not locked there
    fcntl = None

log = logging.getLogger(__name__)

INPUTS = ".qilin-run.json"
FINISHED = "qilin.json"  # the run-directory contract, written with the final weights: a model is there
# held with flock by the process training into the directory: the kernel drops it when that process ends in any way
# (a crash, SIGKILL, a node lost), so no lock outlives its run
LOCK = ".qilin-run.lock"
_held: dict[str, int] = {}  # resolved output directory -> its lock's file descriptor, while this process trains there
# settings that change how a run reports or saves, not what it learns: a resume may change them
MAY_CHANGE = {"data.num_workers", "train.report_to", "train.logging_steps", "train.save_steps",
              "train.save_total_limit", "output_dir"}


def prepare(recipe: Recipe, resume: bool, overwrite: bool = False) -> Path:
    """Claim and ready the output directory. Under torchrun the first process claims it and writes; the others
    check the same things and write nothing, so a second launch into a claimed directory changes no file in it."""
    out = Path(recipe.output_dir)
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: a file, not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_run(out):
        if overwrite:
            raise UserError(f"{out}: not a qilin-lite training output; --overwrite only replaces runs, so choose "
                            "another --out or empty it yourself")
        raise UserError(f"{out}: not empty and not a qilin-lite run (nothing in it was changed); choose a new or "
                        "empty --out")
    writer = rank() == 0
    if writer:
        claim(out)
    try:
        checkpoints = out.is_dir() and any(out.glob("checkpoint-*"))
        finished = (out / FINISHED).exists()
        if overwrite and out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
            if writer:
                _empty(out)  # the old loss curve, logs and checkpoints go with the old model
        elif finished and not resume:
            raise UserError(f"{out}: holds a finished run; choose another --out, or pass --overwrite to replace it")
        elif checkpoints and not resume:
            raise UserError(f"{out}: holds checkpoints of an earlier run; pass --resume to continue it or choose "
                            "another --out")
        inputs = {"data": {k: digest(v) for k, v in (("train", recipe.data.train), ("eval", recipe.data.eval)) if v}}
        if resume and (out / "recipe.yaml").exists():
            same_inputs(recipe, out, inputs)
        out.mkdir(parents=True, exist_ok=True)
        if writer:  # whole files: the other processes may read them while this one writes
            tmp = out / ".recipe.yaml.tmp"
            save_recipe(recipe, tmp)
            os.replace(tmp, out / "recipe.yaml")
            write_text_atomic(out / INPUTS, json.dumps(inputs, indent=1, ensure_ascii=False) + "\n")
    except BaseException:
        release(out)
        raise
    return out


def is_run(out: Path) -> bool:
    """Whether a directory holds a run qilin-lite trained (finished, interrupted, or starting): what --out may reuse."""
    return any((out / name).exists() for name in (FINISHED, "recipe.yaml", INPUTS, LOCK)) or \
        any(out.glob("checkpoint-*"))


def claim(out: Path) -> None:
    """Hold the directory's lock for this process, or fail at once with one line when another run holds it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    if fcntl is None:
        log.warning("%s: no file locks on this system; make sure no other run trains into it at the same time", out)
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(fd)
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise UserError(f"{out}: another run is training into this directory ({holder or LOCK + ' is held'}"
                                "); wait for it to end, or choose another --out") from None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                log.warning("%s: its file system cannot lock files; make sure no other run trains into it at the same "
                            "time", out)
                return
            raise
        # a run that ended removed the file it held; a lock on a removed file would guard nothing
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        os.close(fd)
    with contextlib.suppress(OSError):  # who holds it, for the other run's message; a full disk may refuse
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
    _held[str(out.resolve())] = fd


def release(out: Path) -> None:
    """Give up the directory's lock (a process that ends without this gives it up too)."""
    fd = _held.pop(str(Path(out).resolve()), None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        (Path(out) / LOCK).unlink()  # while still held: a run that opened the old file sees it gone and retries
    os.close(fd)


def _read(fd: int) -> str:
    """Who holds the lock, as its holder wrote it; printable characters only, the message stays one line."""
    with contextlib.suppress(OSError):
        return "".join(c for c in os.pread(fd, 200, 0).decode("utf-8", "replace") if c.isprintable()).strip()
    return ""


def _empty(out: Path) -> None:
    """Everything in the directory but its lock, which this process holds."""
    for p in out.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def same_inputs(recipe: Recipe, out: Path, inputs: dict) -> None:
    """--resume: the recipe and the data must be the ones the run recorded. A path is compared as the file it names
    (`x.json` and `/abs/x.json` are one file) and a data file by its contents, wherever it lies now."""
    recorded = _flat(load_recipe(out / "recipe.yaml", None, output_dir=recipe.output_dir).to_dict())
    now = _flat(recipe.to_dict())
    before = json.loads((out / INPUTS).read_text(encoding="utf-8")).get("data", {}) if (out / INPUTS).exists() else None

    def same(k: str) -> bool:
        a, b = recorded.get(k), now.get(k)
        if a == b or _same_file(a, b):
            return True
        part = k.removeprefix("data.")
        return k in ("data.train", "data.eval") and before is not None and before.get(part) is not None and \
            before.get(part) == inputs["data"].get(part)

    changed = [f"{k}: {recorded.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(recorded) | set(now))
               if k not in MAY_CHANGE and not same(k)]
    if before is not None:
        changed += [f"data.{k}: the file's contents changed" for k in sorted(set(before) | set(inputs["data"]))
                    if before.get(k) != inputs["data"].get(k) and f"data.{k}" not in {c.split(":")[0] for c in changed}]
    if changed:
        raise UserError(f"{out}: --resume with other settings or data than the run recorded ({'; '.join(changed[:4])}"
                        f"{'; ...' if len(changed) > 4 else ''}); resume with the same ones, or train into a new --out")


def digest(source: str) -> str | list:
    """A file's content digest (a touched or copied-back file is the same data); a folder's or hub name's identity."""
    p = Path(source)
    if not p.is_file():
        from ..data.cache import file_identity

        return file_identity(source)
    h = hashlib.blake2b(digest_size=16)
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _same_file(a, b) -> bool:
    """Two spellings of one existing file or folder (relative and absolute, through a link)."""
    if not (isinstance(a, str) and isinstance(b, str) and a and b):
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing, or a hub name
        return False


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
