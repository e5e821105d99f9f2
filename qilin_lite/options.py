"""Command-line options several commands share, declared once (typer `Annotated` types), so a flag reads and
behaves the same in chat, web, image and eval."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import UserError

ImageFiles = Annotated[list[Path], typer.Argument(
    metavar="IMAGE...", help="image file(s): JPEG/PNG/TIFF/DICOM...; 2-4 are joined into one")]
ModelDir = Annotated[str, typer.Option("--model", help="run directory (align/lora/qlora/full/merged) or hub id")]
Window = Annotated[Optional[str], typer.Option("--window", help="CENTER,WIDTH for DICOM / 16-bit images, e.g. 40,400")]
Frame = Annotated[Optional[int], typer.Option("--frame", help="frame of a multi-frame file (DICOM default: middle)")]
Load4bit = Annotated[bool, typer.Option("--load-4bit", help="quantize the LLM to 4-bit NF4 on load")]
Load8bit = Annotated[bool, typer.Option("--load-8bit", help="quantize the LLM to 8-bit on load")]

Dtype = Annotated[str, typer.Option("--dtype", help="auto (bfloat16 on a GPU that has it, float16 on older GPUs, "
                                                    "float32 on the CPU) | bfloat16 | float16 | float32")]
Attn = Annotated[str, typer.Option("--attn", help="auto (flash-attn on CUDA if installed, else sdpa) | sdpa | eager | "
                                                  "flash_attention_2")]


def dtype_arg(value: str) -> str | None:
    """--dtype -> what `load_generator` takes: None lets device.py choose for this machine."""
    return None if value == "auto" else value


def quant_bits(load_4bit: bool, load_8bit: bool) -> int | None:
    """--load-4bit / --load-8bit -> the bits `load_generator` takes (None: unquantized)."""
    if load_4bit and load_8bit:
        raise UserError("choose one of --load-4bit and --load-8bit")
    return 4 if load_4bit else 8 if load_8bit else None


# the recipe-driven commands' options (align, tune, prefer, reinforce): a flag left out is None / False, so the
# recipe's own value stands (see `given`)
RecipeFile = Annotated[Optional[Path], typer.Argument(help="recipe YAML (see recipes/); flags override its fields")]
ImageFolder = Annotated[Optional[Path], typer.Option("--image-folder", help="folder the records' image names are relative to")]
OutDir = Annotated[Optional[Path], typer.Option("--out", help="output directory (the contract later commands read)")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="override any recipe field: section.key=value")]
Resume = Annotated[bool, typer.Option("--resume", help="continue an interrupted run from its last checkpoint")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace a finished run in --out (otherwise refused)")]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="set bad records aside in OUT/rejects.jsonl instead of stopping")]
MaxLen = Annotated[Optional[int], typer.Option("--max-length", help="tokens per sample, image tokens included")]
RecipeAttn = Annotated[Optional[str], typer.Option("--attn", help="auto (flash-attn on CUDA if installed, else sdpa) | sdpa | eager | flash_attention_2")]


def main_process() -> bool:
    """Under torchrun every process runs the command; one of them reports."""
    return os.environ.get("RANK", "0") == "0"


def given(**kw) -> dict:
    """The flags a user typed (a recipe field each), without those left out."""
    return {k: v for k, v in kw.items() if v is not None and v is not False}
