"""Per-step overhead: where a training step's time goes, for qilin-lite's trainer and against a bare loop.

    python benchmarks/trainer_vs_bare_loop.py [--steps 24] [--accumulation 8] [--workers 0] [--quick]

One tiny Llava (LLM 256 x 2 layers, 64 image tokens), ChiMed-VL-shaped tune records (harness/synth.py), full fine-tune,
fp32, sdpa, 1 thread, no DataLoader workers by default, batch 1 x `accumulation` micro-batches per optimizer step
(the shape of the QLoRA recipe: batch 1, 128 accumulated), logging every step as the paper recipes do.

Runs, interleaved over 3 rounds (medians):
- `lean`:  qilin-lite as shipped (`train.lean_metrics: true`): entropy / top-1 only on a logging step's last
           micro-batch, the token count gathered when a log is due;
- `trl`:   the same trainer with `train.lean_metrics: false`: trl's compute_loss on every micro-batch;
- `trainer`: `trl` with the Trainer's own per-micro-batch code back (model.train() and the parameter count on every
           micro-batch, the NaN/inf filter's host read of the loss): the stock SFTTrainer's step on our data path;
- `bare`:  the same batches, in memory, through `model(**batch, fused_lm_head=True).loss.backward()` and the same
           AdamW step: nothing but forward, loss, backward and optimizer.
Each trainer step is split into data wait (inside `get_batch_samples`), forward + loss (`compute_loss`), backward
(the rest of `training_step`), optimizer (`on_pre_optimizer_step` -> `on_optimizer_step`) and other (the rest:
callbacks, logging, scheduler). Overhead = trainer step time / bare step time - 1; "data wait excluded" compares
the work the bare loop also does (its batches are already in memory). On this model the module walks are small;
`host_work_vs_trainer.py` measures them on the real 13B structure, where they are not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.probe import PARTS, Probe, instrumented  # noqa: E402


def trainers_own(cls):
    """`cls` (QilinTrainer) with the Trainer's own per-micro-batch code back: model.train() and the parameter count on
    every micro-batch, and the NaN/inf filter's host read of the loss (what a stock SFTTrainer does per step)."""
    from transformers import Trainer
    from trl import SFTTrainer

    class TrainersOwn(cls):
        train = SFTTrainer.train
        training_step = SFTTrainer.training_step
        floating_point_ops = Trainer.floating_point_ops

    return TrainersOwn


def train_once(base: Path, data: dict, out: Path, *, run: str, steps: int, accumulation: int, workers: int = 0,
               keep_batches: bool = False):
    import qilin_lite.train.stage as train_mod
    from qilin_lite.config import REPO_RECIPES, load_recipe

    lean = run == "lean"
    clock = Probe(keep_batches=keep_batches)
    recipe = load_recipe(REPO_RECIPES / "qilin-med-vl/tune-full.yaml", [
        "train.deepspeed=", "model.dtype=float32", "model.attn=sdpa", "train.bf16=false", "train.tf32=false",
        "train.gradient_checkpointing=false", "train.per_device_batch=1", f"train.global_batch={accumulation}",
        f"train.max_steps={steps}", "train.save_steps=1000000", "train.logging_steps=1", f"data.num_workers={workers}",
        f"train.lean_metrics={str(lean).lower()}",
    ], output_dir=str(out), **{"model.base": str(base), "data.train": str(data["tune"]),
                               "data.image_folder": str(data["images"])})
    from qilin_lite.train.trainer import QilinTrainer

    trainer_cls = trainers_own(QilinTrainer) if run == "trainer" else QilinTrainer
    _, model = train_mod.train_stage(recipe, trainer_cls=instrumented(trainer_cls, clock))
    return clock, model


def bare_steps(model, batches: list[list[dict]], lr: float = 2e-5) -> list[float]:
    """Forward + loss + backward + AdamW on the recorded micro-batches; nothing else."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs",))  # the log-probabilities alone, whatever the trainer left installed
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    times = []
    for step in batches:
        t = time.perf_counter()
        for b in step:
            out = model(**{k: v for k, v in b.items() if k != "num_items_in_batch"}, use_cache=False,
                        fused_lm_head=True)
            (out.loss / len(step)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def main(argv=None) -> dict:
    from benchmarks.harness.synth import ModelSize, build_base, write_records
    from qilin_lite.model import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--accumulation", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0,
                    help="DataLoader workers (default 0: with the recipes' 4 on 2 cores the workers take the training "
                         "process's core; vs_trl.py measures the data wait with them)")
    ap.add_argument("--quick", action="store_true", help="2 steps, 1 round: the code path only")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.accumulation = 2, 1, 2
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = build_base(work / "model", ModelSize(hidden=256, layers=2))
        data = write_records(work / "data", load_tokenizer(str(base)), n=args.steps * args.accumulation + 8,
                             image_size=64)
        skip = 2 if args.steps > 4 else 0  # warm-up steps left out of the medians
        rows: dict[str, list[dict]] = {"lean": [], "trl": [], "trainer": []}
        bare: list[float] = []
        for r in range(args.rounds):
            for name in rows:
                clock, model = train_once(base, data, work / f"{name}-{r}", run=name, steps=args.steps,
                                          accumulation=args.accumulation, workers=args.workers,
                                          keep_batches=name == "lean")
                rows[name] += clock.parts[skip:]
                if name == "lean":
                    batches = clock.batches
            bare += bare_steps(model, batches)[skip:]
    med = lambda xs: statistics.median(xs) if xs else 0.0  # noqa: E731
    bare_s = med(bare)
    result = {"steps": args.steps, "accumulation": args.accumulation, "rounds": args.rounds, "bare_step_s": bare_s,
              "runs": {}}
    for name, steps in rows.items():
        parts = {p: med([s[p] for s in steps]) for p in PARTS}
        total = med([s["total"] for s in steps])
        own = med([s["total"] - s["data_wait"] for s in steps])  # the trainer's own work: what the bare loop does
        result["runs"][name] = {"step_s": total, "overhead_vs_bare": total / bare_s - 1 if bare_s else None,
                                "own_overhead_vs_bare": own / bare_s - 1 if bare_s else None,
                                **{f"{p}_s": v for p, v in parts.items()}}
    print(table(result))
    return result


def table(r: dict) -> str:
    lines = [f"per optimizer step, median ({r['accumulation']} micro-batches of 1; {r['rounds']} rounds):",
             "| run | step s | vs bare | vs bare, data wait excluded | data wait | forward + loss | backward | optimizer "
             "| other |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, x in r["runs"].items():
        lines.append(f"| {name} | {x['step_s']:.3f} | {x['overhead_vs_bare']:+.1%} | {x['own_overhead_vs_bare']:+.1%} | "
                     f"{x['data_wait_s']:.3f} | "
                     f"{x['forward_loss_s']:.3f} | {x['backward_s']:.3f} | {x['optimizer_s']:.3f} | "
                     f"{x['other_s']:.3f} |")
    lines.append(f"| bare | {r['bare_step_s']:.3f} | | | | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
