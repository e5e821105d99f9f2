"""`qilin-lite prefer`: a thin command over run.run_prefer (added to the CLI by cli.py; its flags are options.py's), and `qilin-lite data pairs`
over pairs.pairs_from_eval (added beside the other data commands)."""


from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import options


def register(app: typer.Typer) -> None:
    @app.command()
    def prefer(
        recipe: options.RecipeFile = None,
        from_run: Annotated[Optional[Path], typer.Option("--from", help="the model to improve: a lora/qlora tune run (its adapter trains on), an align, merged, full or converted run, or a released model")] = None,
        lora: Annotated[bool, typer.Option("--lora", help="LoRA on the LLM (a tune run's own adapter, or a new one)")] = False,
        qlora: Annotated[bool, typer.Option("--qlora", help="4-bit NF4 LLM + LoRA")] = False,
        full: Annotated[bool, typer.Option("--full", help="the whole LLM trains (the reference is a second copy)")] = False,
        data: Annotated[Optional[str], typer.Option("--data", help="preference pairs: JSON/JSONL with a prompt, 'chosen' and 'rejected' (and images)")] = None,
        image_folder: options.ImageFolder = None,
        out: options.OutDir = None,
        beta: Annotated[Optional[float], typer.Option("--beta", help="DPO's beta: how far from the reference the policy may move (default 0.1)")] = None,
        loss: Annotated[Optional[str], typer.Option("--loss", help="trl's DPO loss type(s): sigmoid (DPO), ipo, hinge, robust, apo_zero, ... (a comma list mixes several)")] = None,
        max_length: options.MaxLen = None,
        attn: options.RecipeAttn = None,
        skip_bad: options.SkipBad = False,
        resume: options.Resume = False,
        overwrite: options.Overwrite = False,
        set_: options.Sets = None,
    ):
        """After tune: DPO on pairs of a better and a worse reply; the output directory reads as a tune run's."""
        from ..config import load_recipe
        from ..errors import UserError
        from ..train.trainer import Stopped
        from .run import run_prefer

        modes = [m for m, on in (("lora", lora), ("qlora", qlora), ("full", full)) if on]
        if len(modes) > 1:
            raise UserError(f"choose one of --lora, --qlora, --full (got {', '.join('--' + m for m in modes)})")
        fields = options.given(**{
            "train.mode": modes[0] if modes else None, "model.from_run": str(from_run) if from_run else None,
            "data.train": data, "data.image_folder": str(image_folder) if image_folder else None,
            "train.beta": beta, "train.dpo_loss": loss, "data.max_length": max_length, "model.attn": attn,
            "data.skip_bad": skip_bad})
        if recipe is None:
            fields.setdefault("train.mode", "lora")
            if not any(s.split("=", 1)[0].strip() == "train.lr" for s in set_ or []):
                # the recipe default (align's 1e-3) would throw the policy off its reference at once: DPO's usual
                # rates instead, LLaMA-Factory's LoRA DPO example (5e-6) and Zephyr's full DPO (5e-7)
                fields["train.lr"] = 5e-7 if fields["train.mode"] == "full" else 5e-6
        r = load_recipe(recipe, set_, stage="prefer", output_dir=str(out) if out else None, **fields)
        try:
            done = run_prefer(r, resume=resume, overwrite=overwrite)
        except Stopped as e:
            if options.main_process():
                typer.echo(str(e), err=True)
            return
        if options.main_process():
            typer.echo(f"prefer done: {done}  (next: qilin-lite chat IMAGE --model {done})")
