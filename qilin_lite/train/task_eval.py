"""Task metrics while training (`tune --eval-task [TASK:]FILE --eval-every N --keep-best`): every N optimizer steps
the model in training answers a benchmark (any layout `eval` reads) and the score is logged beside the loss.

In:  the recipe's data.eval_task / data.eval_task_images / train.eval_every / train.eval_task_metric /
     train.keep_best, the model being trained, its tokenizer and image processor.
Out: `task_<metric>` with `task_<metric>_ci_low` / `_ci_high` (its 95% bootstrap interval) in the trainer's log
     (TensorBoard, log_history.json); OUT/eval_history.json, one entry per evaluation; with keep_best the best
     checkpoint is kept from rotation and the finished run holds its weights.

The same code as `eval`: its item readers, its prompt (`eval.run.conversation_for`), its batches (8 questions,
greedy, 64 new tokens) and its scoring (`aggregate`). Under DDP every process answers (the same answers, so the same
decision to save a best checkpoint); a sharded model (FSDP, ZeRO-3) cannot generate on one process and is refused
before any work.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from transformers import TrainerCallback

from ..errors import UserError

log = logging.getLogger(__name__)

HISTORY = "eval_history.json"
BATCH, MAX_NEW_TOKENS = 8, 64  # eval's defaults
# the metric followed when the recipe says auto: the first of these the benchmark's questions have
AUTO_ORDER = ("accuracy", "closed_strict", "short_accuracy", "open_recall", "rougeL")
METRICS = AUTO_ORDER + ("closed_llavamed",)


def split_task(spec: str) -> tuple[str, str]:
    """'slake:SLAKE/test.json' -> ('slake', 'SLAKE/test.json'); a bare FILE is read as eval's `llava` layout (held-out
    dialogs with an answer, as `tune --data` records are)."""
    from ..eval.items import TASKS

    head, sep, rest = spec.partition(":")
    if sep and head in TASKS:
        return head, rest
    return "llava", spec


def load_task_items(recipe) -> list:
    from ..eval.benchmarks import load_eval_items
    from ..eval.run import check_images

    task, path = split_task(recipe.data.eval_task)
    if not Path(path).exists():
        raise UserError(f"data.eval_task {path}: no such benchmark file; give [TASK:]FILE, e.g. "
                        "--eval-task slake:SLAKE/test.json")
    # a held-out split of the training data (llava layout) has its images where the training data has them
    images = recipe.data.eval_task_images or (recipe.data.image_folder if task == "llava" else None)
    items = load_eval_items(path, task, images)
    check_images(items)
    return items


def followed_metric(recipe, items) -> str:
    wanted = recipe.train.eval_task_metric
    kinds = {it.kind for it in items}
    from ..eval.metrics import MEAN_METRICS

    present = [m for k in kinds for m in MEAN_METRICS.get(k, {})]
    if wanted != "auto":
        if wanted not in present:
            raise UserError(f"train.eval_task_metric {wanted}: the benchmark's questions give {', '.join(present)}")
        return wanted
    return next(m for m in AUTO_ORDER if m in present)


def check(recipe, sharded: bool) -> None:
    """What fails without work: a task with nothing to follow it by, on a model that cannot answer alone."""
    if recipe.data.eval_task is None:
        if recipe.train.keep_best:
            raise UserError("--keep-best keeps the best checkpoint by the task metric: give --eval-task [TASK:]FILE")
        return
    if recipe.stage != "tune":
        raise UserError("--eval-task scores answers, which an align run (projector only, plain captions) does not "
                        "give; use it with tune")
    if sharded:
        raise UserError("--eval-task: a model sharded by FSDP or ZeRO-3 cannot answer on one process; evaluate the "
                        "checkpoints with qilin-lite eval instead")
    if recipe.data.packing:
        # packed training switches the language model to per-sample attention, which cannot decode
        raise UserError("--eval-task with --packing: packed rows train with an attention that cannot generate "
                        "answers; drop one of them (evaluate the checkpoints with qilin-lite eval)")


def _world() -> tuple[int, int]:
    """(processes, this one's rank) of the run; (1, 0) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class TaskEval(TrainerCallback):
    """Answer the benchmark every `every` optimizer steps (and after the last one); log and record the score."""

    def __init__(self, recipe, items, tokenizer, image_processor, model_config, out: Path, *, metric: str):
        from ..families import get_template
        from ..images.pixel_values import image_loader
        from ..model import image_mode_for

        self.items, self.tokenizer, self.out, self.metric = items, tokenizer, Path(out), metric
        self.template = get_template(recipe.template)
        # the images as training reads them (train/data.py): the family's mode (native resolution for Qwen-VL) and
        # the processor training uses, its pixel bounds set
        self.images = image_loader(image_processor, image_mode_for(model_config, recipe.data.image_mode,
                                                                   recipe.image_mode))
        self.every, self.keep_best = recipe.train.eval_every, recipe.train.keep_best
        self.trainer = None  # set by attach(): the trainer whose public log() the score goes to
        self.history = self._read_history()

    def attach(self, trainer) -> None:
        self.trainer = trainer
        trainer.add_callback(self)

    def _read_history(self) -> list[dict]:
        """The stopped run's history; one it cannot read (hand-edited, cut off) is kept aside under another name
        with a warning, never overwritten, and the history starts again from what is asked anew."""
        path = self.out / HISTORY
        if not path.is_file():
            return []
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, list) and all(isinstance(h, dict) and isinstance(h.get("step"), int)
                                               and isinstance(h.get("value"), (int, float)) for h in rows):
                return rows
        except (ValueError, OSError, UnicodeDecodeError):
            pass
        aside, k = path.with_name(HISTORY + ".unreadable"), 1
        while aside.exists():  # an earlier one is kept too
            aside, k = path.with_name(f"{HISTORY}.unreadable.{k}"), k + 1
        os.replace(path, aside)
        log.warning("%s: not a task-evaluation history (a list of {step, value, ...}); kept as %s, and the history "
                    "starts again from this run's evaluations", path, aside.name)
        return []

    def on_train_begin(self, args, state, control, **kwargs):
        # a resumed run starts from its checkpoint's step: evaluations written after it (by the run that stopped)
        # are asked again, so the history and the best checkpoint (restored with the trainer's state) agree
        self.history = [h for h in self.history if h["step"] <= state.global_step]
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        last = state.max_steps and state.global_step >= state.max_steps
        due = self.every > 0 and state.global_step % self.every == 0
        if not (due or last) or any(h["step"] == state.global_step for h in self.history):
            return control
        if control.should_training_stop and not last:  # a SIGTERM or non-finite stop: save and go, answer nothing
            return control
        # every process takes part (each holds the whole model; sharded ones are refused), answering its share of
        # the batches; all reach the same score and so the same save decision, which the processes must agree on
        score = self.evaluate(model, state)
        if self.keep_best:
            best = state.best_metric
            if best is None or score > best:
                # this step's checkpoint is the best so far: save it now and keep it from rotation
                state.best_metric = score
                state.best_model_checkpoint = str(Path(args.output_dir) / f"checkpoint-{state.global_step}")
                control.should_save = True
        return control

    def evaluate(self, model, state) -> float:
        from ..eval.metrics import aggregate
        from ..eval.run import conversation_for
        from ..model import token_layout
        from ..serve.generate import Generator

        unwrapped = model
        was_training = unwrapped.training
        unwrapped.eval()
        gen = Generator(unwrapped, self.tokenizer, self.images, self.template,
                        token_layout(unwrapped.config, max_length=10**9), max_new_tokens=MAX_NEW_TOKENS,
                        temperature=0.0)
        # eval's own batches, dealt out to the processes in turn (each holds the whole model), their answers
        # gathered back in order: every process then has every answer, the same score and the same save decision
        world, rank = _world()
        starts = list(range(0, len(self.items), BATCH))
        mine: dict[int, list[str]] = {}
        # accelerate puts autocast on the prepared model's forward only; generate goes around it, and in bf16 the
        # fp32 trained projector would meet bf16 image features
        try:
            with self.trainer.accelerator.autocast():
                for k, start in enumerate(starts):
                    if k % world != rank:
                        continue
                    batch = self.items[start: start + BATCH]
                    mine[start] = gen.generate([conversation_for(it, gen.template) for it in batch],
                                               [it.shown(gen.template) for it in batch])
        finally:
            unwrapped.train(was_training)
        shares = [mine]
        if world > 1:
            import torch.distributed as dist

            shares = [None] * world
            dist.all_gather_object(shares, mine)
        merged = {start: a for share in shares for start, a in share.items()}
        answers = [a for start in starts for a in merged[start]]
        answered = [sum(len(a) for a in share.values()) for share in shares]
        metrics = aggregate(self.items, answers)["groups"]["all"]
        value = float(metrics[self.metric])
        low, high = metrics.get("ci95", {}).get(self.metric, (None, None))
        logs = {f"task_{self.metric}": value, f"task_{self.metric}_ci_low": low, f"task_{self.metric}_ci_high": high}
        # transformers' own log: trl's would hand this row the step's pending training metrics (entropy, tokens)
        from transformers import Trainer

        Trainer.log(self.trainer, {k: v for k, v in logs.items() if v is not None})
        self.history.append({"step": state.global_step, "epoch": state.epoch, "metric": self.metric, "value": value,
                             "ci95": [low, high], "n": len(self.items), "answered_per_process": answered,
                             "metrics": metrics})
        if not state.is_world_process_zero:
            return value
        from ..files import write_text_atomic

        write_text_atomic(self.out / HISTORY, json.dumps(self.history, ensure_ascii=False, indent=1) + "\n")
        log.info("step %d: task %s %.4f [%s, %s] on %d questions", state.global_step, self.metric, value, low, high,
                 len(self.items))
        return value

    def best(self) -> dict | None:
        return max(self.history, key=lambda h: h["value"]) if self.history else None


def finish(trainer, task: TaskEval) -> None:
    """After training: with keep_best, the model takes the best checkpoint's weights before the run is saved."""
    best = task.best()
    if best is None:
        return
    last = trainer.state.global_step
    log.info("task %s: best %.4f at step %d of %d", task.metric, best["value"], best["step"], last)
    if not task.keep_best or best["step"] == last or task.history[-1]["value"] >= best["value"]:
        return
    checkpoint = trainer.state.best_model_checkpoint
    if not checkpoint or not Path(checkpoint).is_dir():
        raise UserError(f"--keep-best: the best checkpoint (step {best['step']}) is gone from {task.out}; the run "
                        "is not saved; train again without --keep-best or with a larger train.save_total_limit")
    trainer.load_weights(checkpoint)
    log.info("--keep-best: the run holds the weights of %s (task %s %.4f)", Path(checkpoint).name, task.metric,
             best["value"])
