"""Peak memory of align, tune --lora, tune --qlora and tune --full on one model, each in its own process.

In (child):  `python -m benchmarks.memory_by_mode MODE BASE DATA IMAGES OUT` trains a few steps with the real
             `train_stage` and the shipped paper recipe of MODE, CPU-sized.
Out (child): one JSON line: the RSS after the imports (what every mode shares: Python, torch, transformers, trl,
             peft, bitsandbytes), the peak RSS while the model loads and the dataset is built, and the peak while the
             training steps run (Linux `VmHWM`, reset after the imports and again at `on_train_begin`).
`measure(...)` runs the child for every mode and returns those numbers; ratios are taken to `full`.

One process per mode because RSS peaks never go down: in one process the first mode would hide the rest.
`getrusage(RUSAGE_SELF).ru_maxrss` is not used: Linux carries the parent's peak into a child across fork + exec, so a
child of a large process reports the parent's peak (seen here: 1.36 GB in every mode). `VmHWM` belongs to the
child's own address space. DataLoader workers are off (num_workers=0) so every byte is in the measured process.
Two settings make RSS follow live memory, as a GPU's allocated-memory counter does:
- weights are read into memory, not memory-mapped (`from_pretrained(disable_mmap=True)`): a mapped file counts only
  once touched, and QLoRA quantization touches all of it and keeps the mapping, which showed 4-bit weights as fp32;
- `MALLOC_MMAP_THRESHOLD_` is fixed, so freed tensors return to the OS instead of staying in glibc's heap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

MODES = ("align", "lora", "qlora", "full")
RECIPE = {
    "align": "qilin-med-vl/align.yaml",
    "lora": "qilin-med-vl/tune-lora.yaml",
    "qlora": "qilin-med-vl/tune-qlora.yaml",
    "full": "qilin-med-vl/tune-full.yaml",
}
# LoRA ranks are scaled with the hidden size: the recipes' r=128 (lora) / 64 (qlora) are ~4% / ~2% of LLaMA-2 13B
# (hidden 5120); unscaled on a hidden-1024 model they would be ~20% / ~10%, far more weight than in the paper's case.
REAL_HIDDEN = 5120


def _status_kb(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        return True
    except OSError:
        return False


def _load_weights_into_memory() -> None:
    from transformers import LlavaForConditionalGeneration

    load = LlavaForConditionalGeneration.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        kwargs.setdefault("disable_mmap", True)
        return load(cls, *args, **kwargs)

    LlavaForConditionalGeneration.from_pretrained = classmethod(from_pretrained)


def child(mode: str, base: str, data: str, images: str, out: str, hidden: int, steps: int, batch: int) -> dict:
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401  the imports every mode pays, before the baseline
    import trl  # noqa: F401
    from transformers import TrainerCallback

    import qilin_lite.train.stage as train_mod
    from qilin_lite.config import REPO_RECIPES, load_recipe

    if not _reset_peak():
        raise RuntimeError("/proc/self/clear_refs is not writable: peak RSS cannot be measured per phase here")
    kb = {"after_imports": _status_kb("VmRSS")}

    class PeakDuringTraining(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            kb["setup_peak"] = _status_kb("VmHWM")  # loading the model and building the dataset
            kb["train_begin"] = _status_kb("VmRSS")
            _reset_peak()

        def on_train_end(self, args, state, control, **kw):
            kb["train_peak"] = _status_kb("VmHWM")

    from qilin_lite.train.trainer import QilinTrainer

    class Measured(QilinTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.add_callback(PeakDuringTraining())

    _load_weights_into_memory()
    overrides = [
        "train.deepspeed=", "model.dtype=float32", "model.attn=sdpa", "train.bf16=false", "train.tf32=false",
        f"train.per_device_batch={batch}", f"train.global_batch={batch}", f"train.max_steps={steps}",
        "train.save_steps=1000000", "data.num_workers=0",
        "data.template=vicuna_v1", "data.image_mode=pad",  # every mode on the same records and prompt text
    ]
    recipe = load_recipe(REPO_RECIPES / RECIPE[mode], overrides, output_dir=out,
                         **{"model.base": base, "data.train": data, "data.image_folder": images})
    r = recipe.train.lora_r = max(4, round(recipe.train.lora_r * hidden / REAL_HIDDEN))
    train_mod.train_stage(recipe, trainer_cls=Measured)
    mb = {k: round(v / 1024, 1) for k, v in kb.items()}
    return {
        "mode": mode,
        "after_imports_mb": mb["after_imports"],
        "setup_peak_mb": mb["setup_peak"],
        "train_peak_mb": mb["train_peak"],
        "peak_mb": max(mb["setup_peak"], mb["train_peak"]),  # whole run after the imports
        "lora_r": r if mode in ("lora", "qlora") else None,
    }


def measure(base: Path, data: Path, images: Path, out: Path, hidden: int, steps: int = 2, batch: int = 2,
            modes=MODES) -> dict:
    """Run each mode in a fresh process; {mode: numbers}."""
    repo = str(Path(__file__).resolve().parents[1])
    # one thread: memory does not depend on it, and two threads on a shared 2-core machine crawl
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               MALLOC_MMAP_THRESHOLD_="131072")
    results = {}
    for mode in modes:
        shutil.rmtree(Path(out) / mode, ignore_errors=True)  # scratch output of an earlier benchmark run
        cmd = [sys.executable, "-m", "benchmarks.memory_by_mode", mode, str(base), str(data), str(images),
               str(Path(out) / mode), str(hidden), str(steps), str(batch)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"memory run '{mode}' failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
        results[mode] = json.loads(lines[-1])
    return results


if __name__ == "__main__":
    mode, base, data, images, out, hidden, steps, batch = sys.argv[1:9]
    print(json.dumps(child(mode, base, data, images, out, int(hidden), int(steps), int(batch))), flush=True)
