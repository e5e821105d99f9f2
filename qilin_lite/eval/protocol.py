"""Everything that changes an eval number, recorded with it, so two numbers are only compared when comparable.

`protocol.json` (and `metrics.json`'s "protocol") holds:
- benchmark: the file's name and sha256, the task (layout), --limit, and the number of questions scored;
- prompt: the instruction added to every question (--instruction) and the multiple-choice instructions;
- decoding: greedy, max new tokens, batch size, dtype, 4/8-bit;
- controls: the image-reliance controls asked for (--image-blind); judge: its model and prompt version;
- model: its directory name and a fingerprint of its files, its kind and base, the template it is asked in, and
  its image processing (squaring rule, size, mean and std), all read from its files without loading weights;
- qilin_lite: the version (scoring rules may change between versions).

`differences(a, b)` lists what differs. `eval compare` refuses runs whose evaluator's choices differ (benchmark,
prompt, decoding, version) unless told to go on, and notes differences that come with the models themselves
(template, image processing): comparing two models is the point.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .items import CHOICE_INSTRUCTIONS

PROTOCOL = "protocol.json"
MODEL_FIELDS = ("model",)  # differ between the runs being compared, by design


def file_sha256(path: Path) -> str:
    """A file's sha256; for a folder of benchmark files (OmniMedVQA, MMMU), one over its files' names and hashes."""
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.suffix in (".json", ".parquet", ".jsonl", ".csv")):
            h.update(f"{f.relative_to(path)}\0{file_sha256(f)}\0".encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(directory: Path) -> str:
    """A short hash of a model directory's files: names, sizes, the whole of small files and the first and last
    16 MB of weight shards (a 26 GB model is not read whole; retrained weights change both ends of a shard)."""
    h = hashlib.sha256()
    for f in sorted(p for p in directory.iterdir() if p.is_file()):
        if f.suffix not in (".safetensors", ".json", ".model", ".bin", ".txt") or f.name.startswith("."):
            continue
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 64 << 20:
                h.update(fh.read())
            else:
                h.update(fh.read(16 << 20))
                fh.seek(size - (16 << 20))
                h.update(fh.read())
    return h.hexdigest()[:16]


def model_protocol(model: str, template: str | None = None) -> dict:
    """What a model brings to the protocol, from its files (no weights loaded)."""
    from ..model import RunInfo, load_image_processor, resolve_base

    from ..errors import UserError

    p = Path(model)
    if not p.exists() and (str(model).startswith((".", "/", "~")) or str(model).count("/") > 1):
        raise UserError(f"{model}: model directory not found; pass a run directory or a hub id")
    info = RunInfo.load(p) if p.is_dir() else None
    kind, base = (info.kind, info.base) if info else ("base", None)
    out: dict[str, Any] = {"name": p.resolve().name if p.is_dir() else model, "kind": kind,
                           "fingerprint": fingerprint(p) if p.is_dir() else None,
                           "template": template or (info.template if info else "vicuna_v1"),
                           "image_mode": info.image_mode if info else "pad"}
    if base is not None:
        b = Path(resolve_base(p, info))
        out["base"] = {"name": b.name if b.is_dir() else str(base), "fingerprint": fingerprint(b) if b.is_dir() else None}
    ip = load_image_processor(str(model))
    out["image_processor"] = {k: _plain(getattr(ip, k, None)) for k in
                              ("size", "crop_size", "image_mean", "image_std", "resample", "do_center_crop")}
    return out


def _plain(value):
    return json.loads(json.dumps(value, default=lambda o: getattr(o, "__dict__", str(o))))


def build_protocol(*, data: Path, task: str, limit: int | None, n: int, instruction: str | None,
                   decoding: dict, controls: list[str], model: dict, judge: dict | None = None) -> dict:
    from .. import __version__

    return {
        "benchmark": {"file": data.name, "sha256": file_sha256(data) if data.exists() else None, "task": task,
                      "limit": limit, "n": n},
        "prompt": {"instruction": instruction, "choice_instructions": CHOICE_INSTRUCTIONS},
        "decoding": {"greedy": True, **decoding},
        "controls": sorted(controls),
        "judge": judge,
        "model": model,
        "qilin_lite": __version__,
    }


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


# how a model was run, not how it was scored: two systems compared (a run in-process, its export behind a server)
# differ here by design; a resumed evaluation may not (its answers would mix two ways of running)
RUN_DETAILS = ("decoding.batch_size", "decoding.dtype", "decoding.bits", "decoding.served", "decoding.temperature",
               "decoding.top_p")


def differences(a: dict | None, b: dict | None, *, include_model: bool = False, skip: tuple = ()) -> list[str]:
    """'field: A vs B' for each recorded setting that differs (the model's own fields only if asked; `skip`'s
    never)."""
    fa, fb = _flat(a or {}), _flat(b or {})
    out = []
    for key in sorted(set(fa) | set(fb)):
        if (not include_model and key.split(".")[0] in MODEL_FIELDS) or key in skip:
            continue
        if fa.get(key) != fb.get(key):
            out.append(f"{key}: {_show(fa.get(key))} vs {_show(fb.get(key))}")
    return out


def model_notes(a: dict | None, b: dict | None) -> list[str]:
    """Differences that come with the models (template, image processing), for a note under the table."""
    keys = ("model.template", "model.image_mode", "model.image_processor", *RUN_DETAILS)
    return [d for d in differences(a, b, include_model=True) if d.startswith(keys)]


def _show(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
