"""Published benchmark layouts -> EvalItems (`load_eval_items(path, task, image_folder)`): which module reads a task.

- vqa_json.py: vqa-rad, slake, pathvqa, caption, llava (JSON / JSONL records);
- pmc_vqa.py: pmc-vqa (its CSV);
- omnimedvqa.py, mmmu.py: the newer benchmarks, each with its authors' prompt and scoring rule beside its reader.

Each layout, and how its question kind is decided, is specified in docs/eval.md. Image names are joined to
`image_folder` (default: the data file's folder). Ids must be unique within a file; they key resume and
`--predictions` matching. A malformed file or record raises UserError naming file, line or record, and the fix.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError, where
from .items import TASKS, EvalItem
from .mmmu import load_mmmu
from .omnimedvqa import load_omnimedvqa
from .pmc_vqa import load_pmc_vqa
from .vqa_json import load_vqa_json


def load_eval_items(path: str | Path, task: str, image_folder: str | Path | None = None) -> list[EvalItem]:
    """Read a benchmark file in its published layout (see the module docstring) into EvalItems."""
    path = Path(path)
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    if task in ("omnimedvqa", "mmmu") and path.is_dir():
        pass  # a folder of their files
    elif not path.is_file():
        raise UserError(f"{path}: no such data file; check --data")
    folder = Path(image_folder) if image_folder is not None else path.parent
    if task == "pmc-vqa":
        items = load_pmc_vqa(path, folder)
    elif task == "omnimedvqa":
        items = load_omnimedvqa(path, Path(image_folder) if image_folder is not None else None)
    elif task == "mmmu":
        items = load_mmmu(path, Path.home() / ".cache" / "qilin-lite" / "mmmu-images")
    else:
        items = load_vqa_json(path, task, folder)
    if not items:
        raise UserError(f"{path}: no questions found; check --data and --task")
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.id in seen:
            raise UserError(
                f"{where(path, record_id=item.id)}: id used by records {seen[item.id]} and {i}; ids must be unique "
                "(they key resume and --predictions)"
            )
        seen[item.id] = i
    return items

