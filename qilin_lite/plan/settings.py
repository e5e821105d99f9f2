"""Everything the estimate depends on besides the model's shape, from flags or a recipe, and the bytes each stored
parameter takes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..config import deepspeed_path
from ..errors import UserError
from ..train.stages import MODES, llm_bits

ATTENTION = ("auto", "flash_attention_2", "sdpa", "eager")


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """bitsandbytes NF4 storage of one weight: packed 4-bit values, the per-block absmax and the quantization maps.

    Double quantization stores the absmax of every 64-value block as uint8, itself scaled by one fp32 absmax per
    256 blocks (plus a 256-entry fp32 map and an fp32 offset); without it, one fp32 absmax per block.
    ~0.5159 bytes per parameter with double quantization, 0.5625 without.
    """
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    code = 16 * 4  # the NF4 map
    if double_quant:
        return packed + blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4 + code
    return packed + 4 * blocks + code


def int8_bytes(in_features: int, out_features: int) -> int:
    """LLM.int8: one byte per weight plus an fp32 scale per output row."""
    return in_features * out_features + 4 * out_features


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Settings:
    """Everything the estimate depends on besides the model's shape."""

    mode: str = "align"
    gpus: int = 1
    gpu_memory_gib: float = 80.0
    per_device_batch: int = 1
    global_batch: int = 1
    max_length: int = 2048
    images: int = 1  # images per sample planned for (a separate-image template shows each with its own tokens)
    # text: max_length counts text ids with an image as one (the authors' cut), so a sequence holds up to
    # max_length + image tokens - 1 positions, and that is what is planned; total: max_length positions
    length_mode: str = "total"
    gradient_checkpointing: bool = True
    zero_stage: int = 0  # 0: no DeepSpeed
    reduce_bucket: int | None = None  # DeepSpeed reduce_bucket_size (elements); None: "auto" = hidden^2
    fsdp: bool = False  # sharded by FSDP instead: planned as the ZeRO stage with the same bytes per parameter
    dtype: str = "bfloat16"  # the weights' dtype as loaded (model.dtype)
    mixed_precision: bool = True  # Trainer bf16/fp16: autocast (not under DeepSpeed, which casts the model instead)
    load_4bit: bool = False  # align only: the frozen decoder in NF4
    bits: int | None = None  # decoder linear storage: 4, 8 or None (derived from mode/load_4bit when None)
    lora_r: int = 64
    lora_dropout: float = 0.05
    attn: str = "auto"  # auto: what training will pick here (`planned_attention`)
    padding: bool = True  # batches hold padding, so sdpa gets a mask (group_by_length only makes it rarer)
    device: str = "cuda"  # "cpu": the CPU kernels, for validating against CPU measurements
    fused_lm_head: bool = True  # trl >= 1 SFTTrainer; False: full fp32 logits for the cross-entropy
    # prefer / reinforce: a --full run holds a frozen copy of the starting weights as its reference (LoRA's reference
    # is the adapter switched off, or an adapter-sized copy)
    reference_copy: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, not '{self.mode}'")
        if self.gpus < 1 or self.per_device_batch < 1 or self.global_batch < 1:
            raise UserError("--gpus, --batch and the global batch must be at least 1")
        if self.images < 1:
            raise UserError(f"--images must be at least 1, not {self.images}")
        if self.gpu_memory_gib <= 0:
            raise UserError(f"GPU memory must be positive, not {self.gpu_memory_gib}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"ZeRO stage must be 0-3, not {self.zero_stage}")
        if self.dtype not in DTYPE_BYTES:
            raise UserError(f"dtype must be bfloat16, float16 or float32, not '{self.dtype}'")
        if self.attn not in ATTENTION:
            raise UserError(f"attention must be one of {', '.join(ATTENTION)}, not '{self.attn}'")
        if self.device not in ("cuda", "cpu"):
            raise UserError(f"device must be cuda or cpu, not '{self.device}'")
        if self.load_4bit and self.mode != "align":
            raise UserError("load_4bit is for align; for tuning use mode qlora")
        if self.bits is None:
            self.bits = llm_bits(self.mode, self.load_4bit)
        if self.bits not in (None, 4, 8):
            raise UserError(f"bits must be 4 or 8, not {self.bits}")
        if self.mode == "qlora" and self.bits != 4:
            raise UserError("mode qlora loads the decoder in 4-bit")

    @property
    def planned_attention(self) -> str:
        """The kernel training will run: "auto" is device.pick_attention's choice on this machine for a GPU plan
        (flash-attention 2 where CUDA and flash-attn are here, else sdpa), sdpa for a CPU plan."""
        if self.attn != "auto":
            return self.attn
        from ..device import pick_attention

        return pick_attention("auto") if self.device == "cuda" else "sdpa"

    @property
    def accumulation(self) -> int:
        per_step = self.per_device_batch * self.gpus
        if self.global_batch % per_step:
            raise UserError(
                f"global batch {self.global_batch} is not a multiple of batch {self.per_device_batch} x {self.gpus} "
                "GPU(s); choose --batch / --gpus that divide it"
            )
        return self.global_batch // per_step


def settings_from_recipe(recipe, **overrides) -> Settings:
    tr, m = recipe.train, recipe.model
    values = dict(
        mode=tr.mode, per_device_batch=tr.per_device_batch, global_batch=tr.global_batch,
        max_length=recipe.data.max_length, length_mode=recipe.data.length_mode, gradient_checkpointing=tr.gradient_checkpointing, dtype=m.dtype,
        mixed_precision=tr.bf16, load_4bit=m.load_4bit, lora_r=tr.lora_r, lora_dropout=tr.lora_dropout, attn=m.attn,
    )
    values.update(_deepspeed(tr.deepspeed))
    if tr.fsdp_options is not None:
        # fp32 trained weights + fp32 gradients + AdamW = 16 bytes per trained parameter sharded, the same as ZeRO's
        # bf16 weights + gradients + fp32 master and AdamW; full_shard frees weights after use as ZeRO-3 does.
        # train/stage.py computes the loss without trl's fused head under FSDP, so the full logits are counted.
        values.update(fsdp=True, zero_stage=3 if tr.fsdp_options[0] else 2, fused_lm_head=False)
    values.update({k: v for k, v in overrides.items() if v is not None})
    # rows each sample becomes: a pair's chosen and rejected reply (prefer), a question's sampled answers
    # (reinforce); the micro-batch holds that many sequences, each up to max_length
    rows = {"prefer": 2, "reinforce": tr.num_generations}.get(recipe.stage, 1)
    values["per_device_batch"] *= rows
    values["global_batch"] *= rows
    values["reference_copy"] = recipe.stage in ("prefer", "reinforce") and values["mode"] == "full"
    if values["mode"] != "align":
        values["load_4bit"] = False
    return Settings(**values)


def _deepspeed(name: str | None) -> dict:
    path = deepspeed_path(name)
    if path is None:
        return {"zero_stage": 0, "reduce_bucket": None}
    try:
        zero = json.loads(Path(path).read_text(encoding="utf-8")).get("zero_optimization", {})
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    bucket = zero.get("reduce_bucket_size")
    return {"zero_stage": int(zero.get("stage", 0)),
            "reduce_bucket": None if bucket in (None, "auto") else int(float(bucket))}
