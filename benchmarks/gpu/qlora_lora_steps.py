"""One GPU, one script: QLoRA and LoRA training steps of a Qilin-Med-VL-shaped Llava (LLaMA-2 13B + CLIP
ViT-L/14-336, random weights) at the paper's 2048 text tokens, per attention kernel; planned memory against
`torch.cuda.max_memory_allocated`, tokens/s and model FLOPs utilisation, in one table.

    python benchmarks/gpu/qlora_lora_steps.py          # on a CUDA GPU: 13B shapes, sdpa and flash_attention_2
                                                       # if installed
    python benchmarks/gpu/qlora_lora_steps.py --toy    # tiny shapes, any device (the test suite runs this on the CPU)
    python benchmarks/gpu/qlora_lora_steps.py --modes qlora --attn sdpa --steps 2

Each (mode, attention) runs in a fresh process: the model is written once with random weights (bf16 safetensors)
and loaded through qilin-lite's own `load_vlm` (NF4 for QLoRA), configured by `stages.configure` with the shipped
recipes' LoRA (r 128, alpha 256, dropout 0.05) and activation checkpointing, then trained as trl's SFTTrainer does
(fused LM head, token-mean loss, fused AdamW, bf16 autocast): one warm-up step, then `--steps` timed steps of one
sample: 2048 text ids + one image (576 tokens) = 2623 positions, every text token supervised.

Columns: step seconds (median), tokens/s (positions / step time), MFU = model FLOPs per second / the GPU's dense
bf16 peak (`--peak-tflops`, default H100/H200's 989), where model FLOPs per position = 6 x trained parameters +
4 x frozen LLM parameters (forward + input gradients; checkpointing's recomputation not counted) + attention
(12 x layers x hidden x positions, causal halved); peak memory measured and planned (`qilin-lite plan` for the
same settings) and their ratio; and, for LoRA / QLoRA under sdpa, an optimizer step of 8 accumulated batch-1 tune-shaped
micro-batches (one image + 100 ids) with the Trainer's per-micro-batch host work (`model.train()`, a parameter count,
a host read of the loss) against qilin-lite's (`host_habits`): what the GPU loses to it. The whole run is sized for
about 8 minutes on one H200.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

LLAMA2_13B = {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
              "num_key_value_heads": 40, "vocab_size": 32000, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5}
CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"}
TOY_LLM = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 4, "vocab_size": 512, "max_position_embeddings": 512, "rms_norm_eps": 1e-5}
TOY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 56, "patch_size": 14, "projection_dim": 32, "hidden_act": "quick_gelu"}


# LLaMA-shaped decoders of other sizes, for checking the planner's estimate across sizes (check.py):
# OpenLLaMA-3B's and TinyLlama-1.1B's shapes, beside CLIP-L/336
LLAMA_3B = {"hidden_size": 3200, "intermediate_size": 8640, "num_hidden_layers": 26, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6}
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
TOY_WIDE = {**TOY_LLM, "hidden_size": 128, "intermediate_size": 344}
TOY_DEEP = {**TOY_LLM, "num_hidden_layers": 4}
SIZES = {"13b": (LLAMA2_13B, CLIP_L_336, 2048), "3b": (LLAMA_3B, CLIP_L_336, 2048),
         "1b": (LLAMA_1B, CLIP_L_336, 2048), "toy": (TOY_LLM, TOY_VISION, 96),
         "toy-wide": (TOY_WIDE, TOY_VISION, 96), "toy-deep": (TOY_DEEP, TOY_VISION, 96)}


def shapes(size: str) -> tuple[dict, dict, int]:
    """(LLM config, vision config, text ids per sample) of a named size."""
    return SIZES[size]


def write_model(out: Path, size: str) -> Path:
    """Random weights in the layout users' runs have, bf16, written once and reused by every case."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from qilin_lite.plan import llava_config

    llm, vision, _ = shapes(size)
    config = llava_config(vision, llm)
    if (out / "config.json").exists():
        return out
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it is fast; 13B in bf16 is 26 GB
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out)
    del model
    return out


def run_case(model_dir: Path, mode: str, attn: str, steps: int, size: str) -> dict:
    import torch
    from trl.trainer.utils import add_fused_lm_head

    from qilin_lite.model import load_vlm
    from qilin_lite.train.stages import LoraSettings, configure

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    toy = size.startswith("toy")
    llm, vision, text = shapes(size)
    model = load_vlm(str(model_dir), bits=4 if mode == "qlora" else None, dtype="bfloat16", attn=attn)
    if not cuda:
        model.to(device)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    model = configure(model, mode, LoraSettings(128 if not toy else 8, 256 if not toy else 16, 0.05),
                      gradient_checkpointing=True)
    for p in model.parameters():  # train.py: trained parameters stay fp32 beside the bf16 / NF4 frozen ones
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    add_fused_lm_head(base, outputs=("log_probs",))
    model.activation_checkpointing_enable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=cuda)

    n_img = (vision["image_size"] // vision["patch_size"]) ** 2
    positions = text + n_img - 1  # the authors' cut: 2048 text ids with the image counted as one
    inputs = one_sample(model, llm, vision, positions, device)
    num_items = (inputs["labels"][:, 1:] != -100).sum()

    def step() -> float:
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(**inputs, fused_lm_head=True)
        loss = -out.log_probs.sum() / num_items
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    step()  # warm-up: kernels chosen, optimizer state created
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(steps)]
    measured = torch.cuda.max_memory_allocated() if cuda else None
    # once per mode (sdpa), to keep the run inside its 8 minutes
    habits = host_habits(model, optimizer, llm, vision, device, steps) if mode in ("qlora", "lora") and attn == "sdpa" \
        else {}
    trained = sum(p.numel() for p in params)
    frozen_llm = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad and "vision" not in n)
    if mode == "qlora":  # Params4bit store two weights per byte: count the weights, not the bytes
        frozen_llm = sum((p.numel() * 2 if p.__class__.__name__ == "Params4bit" else p.numel())
                         for n, p in model.named_parameters() if not p.requires_grad and "vision" not in n)
    sec = statistics.median(times)
    attn_flops = 12 * llm["num_hidden_layers"] * llm["hidden_size"] * positions / 2
    flops_per_position = 6 * trained + 4 * frozen_llm + attn_flops
    return {"size": size, "mode": mode, "attn": attn, "positions": positions, "step_s": sec, "tokens_per_s": positions / sec,
            "model_tflops_per_s": flops_per_position * positions / sec / 1e12, "peak_bytes": measured,
            "trained_params": trained, **habits}


def one_sample(model, llm: dict, vision: dict, positions: int, device: str) -> dict:
    """One sample of `positions` ids: BOS, the image's tokens, random text, every text token supervised."""
    import torch

    n_img = (vision["image_size"] // vision["patch_size"]) ** 2
    ids = torch.randint(3, llm["vocab_size"], (1, positions), device=device)
    ids[:, 0] = 1
    ids[:, 1:1 + n_img] = model.config.image_token_id
    labels = ids.clone()
    labels[:, :1 + n_img] = -100
    pixels = torch.randn(1, 3, vision["image_size"], vision["image_size"], device=device, dtype=torch.bfloat16)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "labels": labels,
            "use_cache": False}


def host_habits(model, optimizer, llm: dict, vision: dict, device: str, steps: int, micro: int = 8,
                text: int = 100) -> dict:
    """An optimizer step of `micro` accumulated tune-shaped micro-batches (one image + `text` ids, the shape of the
    LoRA / QLoRA recipes' batch-1 micro-batches), with the host work the Trainer does around each micro-batch, and
    with qilin-lite's (QilinTrainer.training_step / floating_point_ops). A reproduction of that host work, not the
    Trainer itself: Trainer = `model.train()` + the parameter count for its FLOPs figure + a host read of the loss
    for its NaN/inf filter; ours = one flag read per module + the filter on the device. Seconds per step, median."""
    import torch

    cuda = device == "cuda"
    n_img = (vision["image_size"] // vision["patch_size"]) ** 2
    inputs = one_sample(model, llm, vision, text + n_img, device)
    labels = inputs["labels"]
    modules = list(model.modules())
    logged = torch.zeros((), device=device)

    def one_step(trainer: bool) -> float:
        nonlocal logged
        t = time.perf_counter()
        for _ in range(micro):
            if trainer:
                model.train()
                model.num_parameters(exclude_embeddings=True)
            else:
                all(m.training for m in modules)
            with torch.autocast(device, dtype=torch.bfloat16):
                out = model(**inputs, fused_lm_head=True)
            loss = -out.log_probs.sum() / (labels[:, 1:] != -100).sum() / micro
            loss.backward()
            loss = loss.detach()
            if trainer and (torch.isnan(loss) or torch.isinf(loss)):  # bool() of a device tensor: a host read
                loss = logged
            elif not trainer:
                loss = torch.where(torch.isfinite(loss), loss, logged)
            logged = logged + loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    one_step(False)  # warm-up at this shape
    runs = {"trainer": [], "ours": []}
    for _ in range(max(steps, 1)):
        for side in runs:  # interleaved
            runs[side].append(one_step(side == "trainer"))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"habits_micro_batches": micro, "habits_trainer_step_s": med["trainer"], "habits_ours_step_s": med["ours"]}


def planned_bytes(mode: str, attn: str, size: str) -> int:
    from qilin_lite.plan import Settings, count_parameters, llava_config, make_plan

    toy = size.startswith("toy")
    llm, vision, text = shapes(size)
    config = llava_config(vision, llm)
    s = Settings(mode=mode, per_device_batch=1, global_batch=1, max_length=text, length_mode="text",
                 gradient_checkpointing=True, lora_r=8 if toy else 128, attn=attn, padding=False, gpu_memory_gib=141)
    return make_plan(count_parameters(config), s).estimate.total


def available_attention() -> list[str]:
    import importlib.util

    import torch

    out = ["sdpa"]
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        out.append("flash_attention_2")
    return out


def table(rows: list[dict], peak_tflops: float) -> str:
    lines = ["| size | mode | attention | positions | step s | tokens/s | MFU | peak memory | planned | "
             "planned / measured | 8 x batch-1 step: Trainer's host work / ours, s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('size', '')} | {r['mode']} | {r['attn']} | failed: {r['error']} | | | | | | | |")
            continue
        peak = r["peak_bytes"]
        lines.append(
            f"| {r.get('size', '')} | {r['mode']} | {r['attn']} | {r['positions']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r['model_tflops_per_s'] / peak_tflops:.1%} | "
            + (f"{peak / 2**30:.1f} GiB" if peak else "n/a (CPU)") + f" | {r['planned_bytes'] / 2**30:.1f} GiB | "
            + (f"{r['planned_bytes'] / peak:.2f}" if peak else "") + " | "
            + (f"{r['habits_trainer_step_s']:.3f} / {r['habits_ours_step_s']:.3f} "
               f"({r['habits_trainer_step_s'] / r['habits_ours_step_s']:.3f}x)" if "habits_ours_step_s" in r else "")
            + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="tiny shapes (any device; what the test suite runs)")
    ap.add_argument("--size", choices=sorted(SIZES), default="13b", help="the model's shapes (--toy: toy)")
    ap.add_argument("--modes", nargs="+", default=["qlora", "lora"])
    ap.add_argument("--attn", nargs="+", default=None, help="default: sdpa, and flash_attention_2 where installed")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200: 989)")
    ap.add_argument("--work", type=Path, default=None, help="where the random model is written (default: a temp dir)")
    ap.add_argument("--case", nargs=2, metavar=("MODE", "ATTN"), help=argparse.SUPPRESS)  # one case, in-process
    args = ap.parse_args(argv)
    size = "toy" if args.toy else args.size
    if args.case:
        mode, attn = args.case
        row = run_case(args.work, mode, attn, args.steps, size)
        print("RESULT " + json.dumps(row))
        return [row]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model((args.work or Path(tmp)) / f"model-{size}", size)
        for mode in args.modes:
            for attn in args.attn or available_attention():
                # a fresh process per case: peak memory and the CUDA caching allocator start clean
                cmd = [sys.executable, __file__, "--case", mode, attn, "--work", str(model_dir),
                       "--steps", str(args.steps), "--size", size]
                p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                found = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                if p.returncode != 0 or not found:
                    tail = (p.stderr.strip().splitlines() or ["no output"])[-1][:160]
                    rows.append({"size": size, "mode": mode, "attn": attn, "error": tail})
                    continue
                row = json.loads(found[-1][len("RESULT "):])
                row["planned_bytes"] = planned_bytes(mode, attn, size)
                rows.append(row)
    print(table(rows, args.peak_tflops))
    return rows


if __name__ == "__main__":
    main()
