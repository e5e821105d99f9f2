"""`qilin-lite reinforce`: a thin command over run.run_reinforce (added to the CLI by cli.py; its flags are options.py's)."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import options


def register(app: typer.Typer) -> None:
    @app.command()
    def reinforce(
        recipe: options.RecipeFile = None,
        from_run: Annotated[Optional[Path], typer.Option("--from", help="the model to improve: a lora/qlora tune run (its adapter trains on), an align, merged, full or converted run, or a released model")] = None,
        lora: Annotated[bool, typer.Option("--lora", help="LoRA on the LLM (a tune run's own adapter, or a new one)")] = False,
        qlora: Annotated[bool, typer.Option("--qlora", help="4-bit NF4 LLM + LoRA")] = False,
        full: Annotated[bool, typer.Option("--full", help="the whole LLM trains (the reference is a second copy)")] = False,
        data: Annotated[Optional[str], typer.Option("--data", help="[TASK:]FILE: questions with checkable answers, any layout eval reads (slake:SLAKE/train.json, pmc-vqa:..., a bare FILE of dialogs with answers)")] = None,
        image_folder: options.ImageFolder = None,
        out: options.OutDir = None,
        generations: Annotated[Optional[int], typer.Option("--generations", help="answers sampled per question (default 8)")] = None,
        beta: Annotated[Optional[float], typer.Option("--beta", help="KL weight against the starting model (default 0.04; 0: no reference pass)")] = None,
        temperature: Annotated[Optional[float], typer.Option("--temperature", help="sampling temperature (default 1.0)")] = None,
        max_completion_length: Annotated[Optional[int], typer.Option("--max-completion-length", help="tokens per sampled answer (default 256)")] = None,
        reasoning: Annotated[bool, typer.Option("--reasoning", help="ask for <think>...</think><answer>...</answer>; reward that layout and score the answer part")] = False,
        attn: options.RecipeAttn = None,
        resume: options.Resume = False,
        overwrite: options.Overwrite = False,
        set_: options.Sets = None,
    ):
        """After tune: GRPO on questions whose answers can be checked, rewarded by eval's own scoring."""
        from ..config import load_recipe
        from ..errors import UserError
        from ..train.trainer import Stopped
        from .run import run_reinforce

        modes = [m for m, on in (("lora", lora), ("qlora", qlora), ("full", full)) if on]
        if len(modes) > 1:
            raise UserError(f"choose one of --lora, --qlora, --full (got {', '.join('--' + m for m in modes)})")
        fields = options.given(**{
            "train.mode": modes[0] if modes else None, "model.from_run": str(from_run) if from_run else None,
            "data.train": data, "data.image_folder": str(image_folder) if image_folder else None,
            "train.num_generations": generations, "train.beta": beta, "train.temperature": temperature,
            "train.max_completion_length": max_completion_length, "train.reasoning": reasoning, "model.attn": attn})
        if recipe is None:
            fields.setdefault("train.mode", "lora")
            if not any(s.split("=", 1)[0].strip() == "train.lr" for s in set_ or []):
                # not align's 1e-3: GRPO's usual rates (R1-V / open-r1-multimodal full runs 1e-6; LoRA 1e-5, as
                # ms-swift's multimodal GRPO examples)
                fields["train.lr"] = 1e-6 if fields["train.mode"] == "full" else 1e-5
        r = load_recipe(recipe, set_, stage="reinforce", output_dir=str(out) if out else None, **fields)
        try:
            done = run_reinforce(r, resume=resume, overwrite=overwrite)
        except Stopped as e:
            if options.main_process():
                typer.echo(str(e), err=True)
            return
        if options.main_process():
            typer.echo(f"reinforce done: {done}  (next: qilin-lite eval run ... --model {done})")
