"""Where a model runs: device, dtype and attention, decided in one place for every command that loads a model.

In:  what the user asked (dtype, attention, quantization bits; None / "auto" for "choose for this machine").
Out: a `Placement`: "cuda" when a CUDA GPU is present, else "cpu"; bf16 on GPUs that support it (fp16 on older
ones, fp32 on the CPU, where half precision is slow and gains nothing at inference); flash-attention 2 on CUDA
where flash-attn is importable, sdpa otherwise; and the `device_map` that loads the weights straight onto the GPU,
so a 13B model is never first materialised in CPU memory (quantized ones too: bitsandbytes places them itself).

Inference (chat, web, eval, the demo's scoring, merge) takes `placement(...)`; training takes
`training_placement(...)`, which leaves placement to the Trainer where DeepSpeed or FSDP shard the model.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from .errors import UserError

DTYPES = ("bfloat16", "float16", "float32")
ATTENTION = ("auto", "flash_attention_2", "sdpa", "eager")


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" | "cpu"
    dtype: str  # one of DTYPES
    attn: str  # "flash_attention_2" | "sdpa" | "eager"
    device_map: dict | None  # from_pretrained's: {"": GPU index} on a GPU, None on the CPU


def cuda() -> bool:
    return torch.cuda.is_available()


def default_dtype() -> str:
    """bf16 on a GPU that has it, fp16 on older GPUs, fp32 on the CPU."""
    if cuda():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"  # CPU half precision is slow and gains nothing at inference


def pick_attention(requested: str = "auto") -> str:
    """flash-attention 2 on CUDA when flash-attn is installed, sdpa otherwise; an explicit choice is honoured."""
    if requested not in ATTENTION:
        raise UserError(f"attention must be one of {', '.join(ATTENTION)}, not '{requested}'")
    flash = cuda() and importlib.util.find_spec("flash_attn") is not None
    if requested == "flash_attention_2" and not flash:
        raise UserError("attention 'flash_attention_2' needs a CUDA GPU and `pip install flash-attn`; use --attn sdpa")
    if requested != "auto":
        return requested
    return "flash_attention_2" if flash else "sdpa"


def placement(*, dtype: str | None = None, attn: str = "auto") -> Placement:
    """Where an inference (or merge) load goes on this machine."""
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    if cuda():
        return Placement("cuda", dtype or default_dtype(), pick_attention(attn), {"": torch.cuda.current_device()})
    return Placement("cpu", dtype or default_dtype(), pick_attention(attn), None)


def training_placement(*, dtype: str, attn: str, bits: int | None, sharded: bool) -> Placement:
    """Where a training load goes: this process's GPU (torchrun's LOCAL_RANK) when there is one, unless DeepSpeed
    or FSDP (`sharded`) place and shard the model themselves; a 4-bit model always loads onto its GPU, as
    bitsandbytes quantizes while loading."""
    attn = pick_attention(attn)
    if cuda() and (bits or not sharded):
        return Placement("cuda", dtype, attn, {"": int(os.environ.get("LOCAL_RANK", "0"))})
    return Placement("cuda" if cuda() else "cpu", dtype, attn, None)
