"""Does an estimate fit, and if not, the smallest change to the settings that makes it fit (with its flags).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .estimate import Estimate, estimate
from .settings import Settings
from .shapes import GiB, Shape


@dataclass
class Suggestion:
    change: str  # in words
    flags: list[str]  # for `qilin-lite align/tune` (and `plan`)
    settings: Settings
    estimate: Estimate


@dataclass
class Plan:
    recipe: str
    shape: Shape
    settings: Settings
    estimate: Estimate
    fits: bool
    suggestion: Suggestion | None = None

    @property
    def capacity(self) -> int:
        return int(self.settings.gpu_memory_gib * GiB)


def fits(est: Estimate, s: Settings) -> bool:
    return est.total <= s.gpu_memory_gib * GiB


def positions(shape: Shape, s: Settings) -> Settings:
    """The settings with max_length in positions: under the authors' text cut, a sequence is the text ids plus
    each image's tokens but one (2048 + 575 at 336 px, per image planned), and memory is spent on positions."""
    if s.length_mode != "text":
        return s
    return replace(s, max_length=s.max_length + s.images * (shape.image_tokens - 1), length_mode="total")


def make_plan(shape: Shape, s: Settings, recipe: str = "") -> Plan:
    s = positions(shape, s)
    est = estimate(shape, s)
    ok = fits(est, s)
    return Plan(recipe, shape, s, est, ok, None if ok else suggest(shape, s))


def _batches(s: Settings, gpus: int, below: bool = False) -> list[int]:
    """Per-device batches (largest first) that keep the global batch with a whole accumulation."""
    top = s.per_device_batch - 1 if below else s.per_device_batch
    return [b for b in range(top, 0, -1) if s.global_batch % (b * gpus) == 0]


def suggest(shape: Shape, s: Settings) -> Suggestion | None:
    """The first change, in order of how little it changes the run, that fits (each with the largest batch that fits):
    1. a lower per-device batch, more accumulation (same global batch, same results);
    2. gradient checkpointing (same results, ~1/3 more compute);
    3. ZeRO-3 on the same GPUs (same results, more communication);
    4. the LLM in 4-bit NF4: align --load-4bit, tune --qlora (different numerics; for full, LoRA instead);
    5. more GPUs with ZeRO-3 (needs hardware).
    """
    ckpt = {} if s.gradient_checkpointing else {"gradient_checkpointing": True}
    candidates: list[tuple[str, dict]] = [("lower the per-device batch", {})]
    if ckpt:
        candidates.append(("turn on gradient checkpointing", ckpt))
    if s.gpus > 1 and s.zero_stage < 3 and not s.bits:
        candidates.append(("shard the weights too with ZeRO-3", {"zero_stage": 3}))
        if ckpt:
            candidates.append(("ZeRO-3 and gradient checkpointing", {"zero_stage": 3, **ckpt}))
    if not s.bits:
        four = {"load_4bit": True} if s.mode == "align" else {"mode": "qlora"}
        what = "load the frozen LLM in 4-bit" if s.mode == "align" else (
            "train QLoRA (4-bit LLM + LoRA) instead" if s.mode == "full" else "switch to QLoRA (4-bit LLM)")
        candidates.append((what, {**four, **ckpt, "bits": None}))
    for n in (2, 4, 8, 16, 32, 64):
        if n > s.gpus:
            more = {"gpus": n, "zero_stage": max(s.zero_stage, 2 if s.bits else 3), **ckpt}
            candidates.append((f"{n} GPUs with ZeRO-{more['zero_stage']}", more))
    for what, changes in candidates:
        trial = replace(s, **changes)
        for b in _batches(trial, trial.gpus, below=not changes):
            t = replace(trial, per_device_batch=b)
            est = estimate(shape, t)
            if fits(est, t):
                words = what if not changes or b == s.per_device_batch else f"{what}, batch {b}"
                if not changes:
                    words = f"lower the per-device batch to {b}"
                return Suggestion(f"{words} (accumulation {t.accumulation})", _flags(s, t), t, est)
    return None


def _flags(old: Settings, new: Settings) -> list[str]:
    flags = []
    if new.mode != old.mode:
        flags.append(f"--{new.mode}")
    if new.load_4bit and not old.load_4bit:
        flags.append("--load-4bit")
    if new.gpus != old.gpus:
        flags.append(f"--gpus {new.gpus}")
    if new.per_device_batch != old.per_device_batch:
        flags.append(f"--set train.per_device_batch={new.per_device_batch}")
    if new.gradient_checkpointing != old.gradient_checkpointing:
        flags.append("--set train.gradient_checkpointing=true")
    if new.zero_stage != old.zero_stage and old.fsdp:
        flags.append(f"--set train.fsdp={'full_shard' if new.zero_stage == 3 else 'shard_grad_op'}")
    elif new.zero_stage != old.zero_stage:
        flags.append(f"--set train.deepspeed=recipes/deepspeed/zero{new.zero_stage}.json")
    return flags
