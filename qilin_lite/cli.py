"""`qilin-lite` command line: each command a few lines over a plain function.

User errors (`UserError`) print one line and exit 2; bugs keep their traceback (without locals: they hold tensors).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import UserError, printable
from .options import ImageFolder as Images, MaxLen, Overwrite, RecipeAttn as Attn, RecipeFile as Recipe, Resume, Sets
from .options import OutDir as Out, SkipBad, given as _fields, main_process as _main_process

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Train and run Chinese medical vision-language models the Qilin-Med-VL way (align -> tune -> chat).",
)

Data = Annotated[Optional[str], typer.Option("--data", help="training data: LLaVA JSON/JSONL or a HF dataset")]
EvalData = Annotated[Optional[str], typer.Option("--eval-data", help="held-out file (same format and image folder): eval loss while training")]
Packing = Annotated[bool, typer.Option("--packing", help="pack several samples per row, no padding (batch counts rows)")]


def _setup_logging() -> None:
    # under torchrun every process would log the same progress; the others keep warnings and errors
    level = os.environ.get("QILIN_LOG", "INFO") if _main_process() else "WARNING"
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("bitsandbytes", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@app.command()
def align(
    recipe: Recipe = None,
    data: Data = None,
    image_folder: Images = None,
    out: Out = None,
    eval_data: EvalData = None,
    model: Annotated[Optional[str], typer.Option("--model", help="an existing base (directory or hub id): a Llava, or a Qwen2.5-VL whose merger aligns")] = None,
    vision: Annotated[Optional[str], typer.Option("--vision", help="vision encoder to join (default CLIP ViT-L/14-336)")] = None,
    llm: Annotated[Optional[str], typer.Option("--llm", help="LLM to join (default FlagAlpha/Llama2-Chinese-13b-Chat)")] = None,
    projector: Annotated[Optional[str], typer.Option("--projector", help="mlp2x_gelu (released weights) | linear (paper text)")] = None,
    load_4bit: Annotated[bool, typer.Option("--load-4bit", help="frozen LLM in 4-bit NF4 so stage 1 fits a small GPU")] = False,
    max_length: MaxLen = None,
    attn: Attn = None,
    skip_bad: SkipBad = False,
    packing: Packing = False,
    resume: Resume = False,
    overwrite: Overwrite = False,
    set_: Sets = None,
):
    """Stage 1: train the projector only (vision tower and LLM frozen) on image-caption pairs."""
    done = _stage("align", recipe, set_, out, resume, overwrite, {
        "model.vision": vision, "model.llm": llm, "model.projector": projector, "model.load_4bit": load_4bit,
        **_data_fields(data, image_folder, model, max_length, attn, skip_bad, packing, eval_data)})
    if done and _main_process():
        typer.echo(f"align done: {done}  (next: qilin-lite tune --from {done} --qlora ...)")


def _data_fields(data, image_folder, model, max_length, attn, skip_bad, packing, eval_data) -> dict:
    """The recipe fields align and tune both take from their flags."""
    return {"data.train": data, "data.image_folder": str(image_folder) if image_folder else None,
            "model.base": model, "data.max_length": max_length, "model.attn": attn, "data.skip_bad": skip_bad,
            "data.packing": packing, "data.eval": eval_data}


def _stage(stage: str, recipe, set_, out, resume: bool, overwrite: bool, fields: dict):
    """The recipe (file, `--set`s, then the flags given) -> a trained output directory, or None when stopped."""
    from .config import load_recipe

    r = load_recipe(recipe, set_, stage=stage, output_dir=str(out) if out else None, **_fields(**fields))
    return _run(r, resume, overwrite=overwrite)


def _run(recipe, resume: bool, trainer_cls=None, overwrite: bool = False):
    """Train; a SIGTERM stop (checkpoint written) is a clean exit 0 with the line saying how to go on.
    `trainer_cls`: a QilinTrainer subclass (tests that stop a run part-way); None: QilinTrainer."""
    from .train.stage import Stopped, run_stage

    try:
        return run_stage(recipe, resume=resume, overwrite=overwrite,
                         **({"trainer_cls": trainer_cls} if trainer_cls else {}))
    except Stopped as e:
        if _main_process():
            typer.echo(str(e), err=True)
        return None


@app.command()
def tune(
    recipe: Recipe = None,
    from_run: Annotated[Optional[Path], typer.Option("--from", help="an align run (its projector is the start), or a released model to tune as it ships: a directory or hub id (lingshu-medical-mllm/Lingshu-7B)")] = None,
    lora: Annotated[bool, typer.Option("--lora", help="bf16 LLM + LoRA on all its linear layers; projector trained")] = False,
    qlora: Annotated[bool, typer.Option("--qlora", help="4-bit NF4 LLM + LoRA; projector trained (one consumer GPU)")] = False,
    full: Annotated[bool, typer.Option("--full", help="LLM and projector fully trained, as the paper")] = False,
    data: Data = None,
    image_folder: Images = None,
    out: Out = None,
    eval_data: EvalData = None,
    model: Annotated[Optional[str], typer.Option("--model", help="a Llava base (or a native VLM such as Qwen2.5-VL) to tune without an align run")] = None,
    max_length: MaxLen = None,
    attn: Attn = None,
    skip_bad: SkipBad = False,
    packing: Packing = False,
    eval_task: Annotated[Optional[str], typer.Option("--eval-task", help="[TASK:]FILE, a benchmark eval reads (e.g. slake:SLAKE/test.json; a bare FILE: held-out dialogs with answers): answered and scored while training, beside the loss")] = None,
    eval_task_images: Annotated[Optional[Path], typer.Option("--eval-task-images", help="folder --eval-task's image names are relative to (default: --image-folder for a bare FILE, else the file's folder)")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="score --eval-task every N optimizer steps (0: after the last step only)")] = None,
    keep_best: Annotated[bool, typer.Option("--keep-best", help="keep the checkpoint with the best --eval-task score; the finished run holds its weights")] = False,
    resume: Resume = False,
    overwrite: Overwrite = False,
    set_: Sets = None,
):
    """Stage 2: train projector + LLM (full, LoRA or QLoRA) on image question-answer dialogs."""
    modes = [m for m, on in (("lora", lora), ("qlora", qlora), ("full", full)) if on]
    if len(modes) > 1:
        raise UserError(f"choose one of --lora, --qlora, --full (got {', '.join('--' + m for m in modes)})")
    done = _stage("tune", recipe, set_, out, resume, overwrite, {
        "train.mode": modes[0] if modes else None, "model.from_run": str(from_run) if from_run else None,
        "data.eval_task": eval_task, "data.eval_task_images": str(eval_task_images) if eval_task_images else None,
        "train.eval_every": eval_every, "train.keep_best": keep_best or None,
        **_data_fields(data, image_folder, model, max_length, attn, skip_bad, packing, eval_data)})
    if done and _main_process():
        typer.echo(f"tune done: {done}  (next: qilin-lite chat IMAGE --model {done})")


@app.command()
def base(
    out: Annotated[Path, typer.Option("--out", help="directory for the joined Llava model")],
    vision: Annotated[str, typer.Option("--vision")] = "openai/clip-vit-large-patch14-336",
    llm: Annotated[str, typer.Option("--llm")] = "FlagAlpha/Llama2-Chinese-13b-Chat",
    projector: Annotated[str, typer.Option("--projector", help="mlp2x_gelu | linear")] = "mlp2x_gelu",
    dtype: Annotated[str, typer.Option("--dtype")] = "bfloat16",
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="accept .bin weights (they can run code)")] = False,
):
    """Join a vision encoder and an LLM into one Llava directory (align does this itself when given --vision/--llm)."""
    from .merge import check_out_dir
    from .model import assemble_base

    check_out_dir(out)  # never over the user's files, nor over a base that runs were trained on
    typer.echo(f"base written: {assemble_base(vision, llm, out, projector=projector, dtype=dtype, allow_pickle=allow_pickle)}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="new directory for the demo's data, models and metrics")] = Path("demo-out"),
    family: Annotated[str, typer.Option("--family", help="llava (the paper's CLIP + LLaMA) | qwen2.5-vl (a tiny Qwen2.5-VL in its own class, native resolution)")] = "llava",
    stage: Annotated[str, typer.Option("--stage", help="sft (align -> tune) | reinforce (align -> tune stopped early -> GRPO) | prefer (align -> tune -> DPO)")] = "sft",
    set_: Sets = None,
):
    """End-to-end demo on synthetic data and a tiny model: align -> tune --qlora -> held-out accuracy."""
    from .demo.run import run_demo

    m = run_demo(out, overrides=set_, family=family, stage=stage)
    typer.echo(f"metrics: {out / 'metrics.json'}")
    if stage == "sft" and m["accuracy_after"] < 0.9:
        typer.echo("note: accuracy after tuning is below 0.9; the demo expects >= 0.9", err=True)


def _register_extensions() -> None:
    """Commands that live beside their code add themselves here, each named: a module that fails to import is a bug
    to see, not a command to skip."""
    from .convert import register as convert
    from .data.cli import register as data
    from .eval.cli import register as evaluate
    from .export.cli import register as export
    from .merge import register as merge
    from .plan.cli import register as plan
    from .prefer.cli import register as prefer
    from .reinforce.cli import register as reinforce
    from .serve.chat import register as chat
    from .serve.image_file import register as image
    from .serve.web import register as web

    for register in (image, chat, merge, convert, export, evaluate, data, plan, web, prefer, reinforce):
        register(app)


_register_extensions()


def _leave_process_group() -> None:
    """Under torchrun: wait for every process, then take the process group down before the interpreter exits. A
    process that exits with it still up (rank 1 while rank 0 is still saving) can abort in gloo's teardown
    ("terminate called without an active exception", exit -6), and torchrun then reports a finished run as failed."""
    import importlib.util

    if "torch" not in sys.modules or importlib.util.find_spec("torch") is None:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def main() -> None:
    _setup_logging()
    try:
        # with standalone_mode=False click returns (not raises) the code of `typer.Exit(n)`
        rc = app(standalone_mode=False)
        _leave_process_group()
        sys.exit(rc if isinstance(rc, int) else 0)
    except UserError as e:
        typer.echo(f"error: {printable(e)}", err=True)  # a file name's newline or NUL stays one line
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors print themselves; anything else is a bug and keeps its traceback
        import click

        from .errors import disk_full

        full = disk_full(e)
        if full:  # an operator's problem, not a bug: one line, and how to go on
            training = len(sys.argv) > 1 and sys.argv[1] in ("align", "tune", "prefer", "reinforce")
            typer.echo(f"error: the disk is full ({full}); free space, then run the same command again"
                       + (" with --resume: training goes on from the last checkpoint saved completely"
                          if training else ""), err=True)
            sys.exit(2)
        # typer bundles its own click: its usage errors are not click's classes, so match either
        if isinstance(e, (click.exceptions.ClickException, getattr(typer, "TyperException", ()))) and hasattr(e, "show"):
            e.show()
            sys.exit(e.exit_code)
        raise
