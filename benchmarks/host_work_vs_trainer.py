"""Host (CPU) work the Trainer does on every micro-batch, on the paper's real model structure, against qilin-lite's.

    python benchmarks/host_work_vs_trainer.py         # LLaMA-2 13B + CLIP ViT-L/14-336 on the meta device (no memory)
    python benchmarks/host_work_vs_trainer.py --toy   # the tests' tiny shapes (the code path only)

On every micro-batch `Trainer.training_step` calls `model.train()`, a walk over every module, and the loop adds
`Trainer.floating_point_ops(inputs)`, which counts the model's parameters again: a walk over every parameter. Both
cost in proportion to the number of modules, which peft's LoRA multiplies (each adapted linear gains its dropout,
A and B and their containers), and are repeated for each of the 128 micro-batches of the QLoRA / LoRA recipes' optimizer
step (batch 1 x 128 accumulated; LoRA 4 x 32). qilin-lite's `QilinTrainer.training_step` checks that every module
already trains (one flag read each, over a list made once) and keeps the parameter count from the first call
(`tests/test_train_misc.py` shows the same weights, logs and FLOPs total as the Trainer's own methods).

The model is LlavaForConditionalGeneration on the meta device, configured by `stages.configure` as the recipes do
(LoRA r 128 on the decoder's linears, projector trained). A QLoRA model has the same modules as the LoRA one, with
bitsandbytes' Linear4bit in place of Linear (not buildable on the meta device). The third per-micro-batch cost the
trainer removes, the host read of the loss for the Trainer's NaN/inf filter, is a wait on the GPU and cannot be
measured without one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPE_MICRO_BATCHES = {"full": 1, "lora": 32, "qlora": 128}  # micro-batches per optimizer step, per GPU


def build(mode: str, toy: bool):
    import torch
    from transformers import LlavaForConditionalGeneration

    from qilin_lite.plan import CLIP_VIT_L14_336, LLAMA2_13B, llava_config
    from qilin_lite.train.stages import LoraSettings, configure

    vision, llm = CLIP_VIT_L14_336, LLAMA2_13B
    if toy:
        vision = {**vision, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
        llm = {**llm, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 2, "vocab_size": 500}
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config(vision, llm))
    model = configure(model, "lora" if mode == "qlora" else mode, LoraSettings(128, 256, 0.05))
    model.train()
    return model


def time_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def measure(mode: str, toy: bool = False, repeats: int = 11) -> dict:
    model = build(mode, toy)
    modules = list(model.modules())
    flops_per_token = 6 * model.num_parameters(exclude_embeddings=True)
    trainer = {
        "model.train()": time_ms(model.train, repeats),
        "floating_point_ops": time_ms(lambda: 6 * 2048 * model.num_parameters(exclude_embeddings=True), repeats),
    }
    ours = {
        "model.train()": time_ms(lambda: all(m.training for m in modules), repeats),
        "floating_point_ops": time_ms(lambda: flops_per_token * 2048, repeats),
    }
    n = RECIPE_MICRO_BATCHES[mode]
    per_micro = {"trainer": sum(trainer.values()), "ours": sum(ours.values())}
    return {"mode": mode, "modules": len(modules), "parameters": sum(p.numel() for p in model.parameters()),
            "trainer_ms": trainer, "ours_ms": ours, "per_micro_batch_ms": per_micro, "micro_batches_per_step": n,
            "per_step_ms": {k: v * n for k, v in per_micro.items()}}


def table(rows: list[dict]) -> str:
    lines = ["| mode | modules | micro-batches per step | Trainer: train() + FLOPs count, ms per micro-batch | ours | "
             "per optimizer step: Trainer / ours, s |", "|---|---|---|---|---|---|"]
    for r in rows:
        t, o = r["trainer_ms"], r["ours_ms"]
        lines.append(f"| {r['mode']} | {r['modules']} | {r['micro_batches_per_step']} | "
                     f"{t['model.train()']:.1f} + {t['floating_point_ops']:.1f} | "
                     f"{o['model.train()']:.2f} + {o['floating_point_ops']:.4f} | "
                     f"{r['per_step_ms']['trainer'] / 1000:.2f} / {r['per_step_ms']['ours'] / 1000:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="tiny shapes: the code path only")
    ap.add_argument("--modes", nargs="*", default=["full", "lora", "qlora"], choices=list(RECIPE_MICRO_BATCHES))
    args = ap.parse_args(argv)
    rows = [measure(m, args.toy, repeats=3 if args.toy else 11) for m in args.modes]
    print(table(rows))
    return rows


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
