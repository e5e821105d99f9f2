"""Guards on a training output directory: a finished model is never replaced silently, and `--resume` never goes on
with other data or settings than the run recorded.

In:  the recipe about to train, the output directory, and the user's --resume / --overwrite.
Out: the directory, ready (created, or emptied on --overwrite), with `recipe.yaml` and `.qilin-run.json` (what the
inputs were: a digest of each data file) written; or a UserError naming what differs and what to do.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..config import Recipe, load_recipe, save_recipe
from ..errors import UserError

INPUTS = ".qilin-run.json"
FINISHED = "qilin.json"  # the run-directory contract, written with the final weights: a model is there
# settings that change how a run reports or saves, not what it learns: a resume may change them
MAY_CHANGE = {"data.num_workers", "train.report_to", "train.logging_steps", "train.save_steps",
              "train.save_total_limit", "output_dir"}


def prepare(recipe: Recipe, resume: bool, overwrite: bool = False) -> Path:
    out = Path(recipe.output_dir)
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    checkpoints = out.is_dir() and any(out.glob("checkpoint-*"))
    finished = (out / FINISHED).exists()
    if overwrite and out.exists() and any(out.iterdir()):
        if not (finished or checkpoints or (out / "recipe.yaml").exists()):
            raise UserError(f"{out}: not a qilin-lite training output; --overwrite only replaces runs, so choose "
                            "another --out or empty it yourself")
        shutil.rmtree(out)  # the old loss curve, logs and checkpoints go with the old model
    elif finished and not resume:
        raise UserError(f"{out}: holds a finished run; choose another --out, or pass --overwrite to replace it")
    elif checkpoints and not resume:
        raise UserError(f"{out}: holds checkpoints of an earlier run; pass --resume to continue it or choose another --out")
    inputs = {"data": {k: digest(v) for k, v in (("train", recipe.data.train), ("eval", recipe.data.eval)) if v}}
    if resume and (out / "recipe.yaml").exists():
        same_inputs(recipe, out, inputs)
    out.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, out / "recipe.yaml")
    (out / INPUTS).write_text(json.dumps(inputs, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def same_inputs(recipe: Recipe, out: Path, inputs: dict) -> None:
    """--resume: the recipe and the data must be the ones the run recorded."""
    recorded = _flat(load_recipe(out / "recipe.yaml", None, output_dir=recipe.output_dir).to_dict())
    now = _flat(recipe.to_dict())
    changed = [f"{k}: {recorded.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(recorded) | set(now))
               if k not in MAY_CHANGE and recorded.get(k) != now.get(k)]
    if (out / INPUTS).exists():
        before = json.loads((out / INPUTS).read_text(encoding="utf-8")).get("data", {})
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


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
