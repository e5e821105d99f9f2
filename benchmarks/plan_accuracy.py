"""How close is `qilin-lite plan` to the memory a training step really takes?

    python benchmarks/plan_accuracy.py                # every case: predicted vs measured peak, and the ratio
    python benchmarks/plan_accuracy.py --case NAME    # one case (what the table runs, each in a fresh process)
    python benchmarks/plan_accuracy.py --paper        # the 13B figures of the paper's recipes, from `qilin-lite plan`
    python benchmarks/plan_accuracy.py --head         # the CPU constants of trl's chunked LM head fallback

Each case builds a small Llava (CLIP + LLaMA) from config on the CPU, loads it with `model.load_vlm` (4-bit for
QLoRA), in float32 or in bf16 with autocast (as the Trainer's `bf16`), and trains it the way the Trainer does:
`stages.configure` for the mode, trl's chunked LM head and loss, activation checkpointing through transformers,
torch's fused AdamW, gradient clipping, `zero_grad(set_to_none=True)`, gradient accumulation. One warm-up step
creates the optimizer state; the next step is measured.

How memory is measured: torch's CPU allocations do not show in tracemalloc, and the process RSS also counts
freed-but-cached heap pages. So:
- persistent state (weights, buffers, quantization state, optimizer state) is summed over the live tensors'
  storages, each counted once, after the warm-up step;
- the step's extra peak comes from torch's profiler with `profile_memory=True`: every allocation and free of the
  measured steps, in order; the peak of their running sum is what `torch.cuda.max_memory_allocated` would report
  above the persistent state.
The phases are told apart by the profiler's op events: the LM head's backward (the planner's "start of
backward"), the rest of the backward (its layers' backward and "end of backward"), the optimizer step.
The planner is run with `device="cpu"` and the case's dtype to compare like with like: the CPU kernels differ from
the GPU ones in two known places (dropout keeps a float mask, trl's LM head falls back to torch ops with tile-sized
temporaries, see `--head`), which the planner models for `device="cpu"`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    name: str
    hidden: int
    layers: int
    mode: str = "full"
    batch: int = 2
    seq: int = 512
    checkpointing: bool = False
    padding: bool = True  # the first sample ends in padding, so sdpa gets a mask
    accumulation: int = 1
    bf16: bool = False  # bf16 weights (fp32 where peft/train.py upcast them) and CPU autocast, as the Trainer's bf16
    vocab: int = 2000  # small, so that the LM head (whose CPU fallback differs from the GPU kernel) does not dominate
    lora_r: int = 16
    family: str = "llava"  # or qwen2.5-vl: the model in its own class, images at native resolution (NATIVE_IMAGE)

    @property
    def intermediate(self) -> int:
        return int(self.hidden * 2.6875)  # LLaMA's ratio (13824 / 5120 = 2.7): 688, 1376, 2064


CASES = [
    Case("h256-full", 256, 4, "full", batch=2, seq=512),
    Case("h512-full", 512, 4, "full", batch=2, seq=512),
    Case("h768-full", 768, 3, "full", batch=2, seq=512),
    Case("h512-full-ckpt", 512, 4, "full", batch=2, seq=512, checkpointing=True),
    Case("h512-align", 512, 4, "align", batch=2, seq=512),
    Case("h512-lora", 512, 4, "lora", batch=2, seq=512),
    Case("h512-lora-ckpt-accum", 512, 4, "lora", batch=2, seq=512, checkpointing=True, accumulation=2),
    Case("h512-qlora", 512, 4, "qlora", batch=2, seq=512),
    Case("h768-qlora-ckpt", 768, 3, "qlora", batch=2, seq=512, checkpointing=True),
]
BF16_CASES = [
    Case("h512-lora-bf16", 512, 4, "lora", batch=2, seq=512, bf16=True),
    Case("h512-qlora-bf16", 512, 4, "qlora", batch=2, seq=512, bf16=True),
    Case("h768-qlora-bf16-ckpt", 768, 3, "qlora", batch=2, seq=512, checkpointing=True, bf16=True),
]
NATIVE_CASES = [
    Case("qwen-vl-h512-lora", 512, 4, "lora", batch=2, seq=512, family="qwen2.5-vl"),
    Case("qwen-vl-h512-qlora-ckpt", 512, 4, "qlora", batch=2, seq=512, checkpointing=True, family="qwen2.5-vl"),
    Case("qwen-vl-h512-full", 512, 4, "full", batch=2, seq=512, family="qwen2.5-vl"),
]
TEST_CASE = Case("test-lora-ckpt", 256, 2, "lora", batch=2, seq=512, checkpointing=True)  # tests/test_plan.py
TEST_NATIVE = Case("test-qwen-vl-lora", 256, 2, "lora", batch=2, seq=512, family="qwen2.5-vl")  # tests/test_plan.py
BY_NAME = {c.name: c for c in CASES + BF16_CASES + NATIVE_CASES + [TEST_CASE, TEST_NATIVE]}

VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, image_size=112,
              patch_size=14, projection_dim=128, hidden_act="quick_gelu")


def llm_dict(c: Case) -> dict:
    return dict(hidden_size=c.hidden, intermediate_size=c.intermediate, num_hidden_layers=c.layers,
                num_attention_heads=c.hidden // 64, num_key_value_heads=c.hidden // 64, vocab_size=c.vocab,
                max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)


# a small Qwen2.5-VL (its vision blocks as Qwen's, narrower) and one 224 x 224 px image per sample: 256 patches, 64
# image tokens in the LLM's sequence, as the processor would make of it
NATIVE_VISION = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=14, spatial_merge_size=2,
                     temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1], hidden_act="silu")
NATIVE_IMAGE = (224, 224)


def native_config(c: Case):
    from qilin_lite.plan.native import native_config as from_dict

    llm = llm_dict(c)
    head = llm["hidden_size"] // llm["num_attention_heads"] // 2
    section = [head // 4, (head - head // 4) // 2, head - head // 4 - (head - head // 4) // 2]
    llm["rope_parameters"] = {"rope_type": "default", "mrope_section": section, "rope_theta": 1000000.0}
    return from_dict(dict(model_type="qwen2_5_vl", text_config=llm,
                          vision_config={**NATIVE_VISION, "out_hidden_size": c.hidden}, image_token_id=c.vocab - 1,
                          video_token_id=c.vocab - 2, vision_start_token_id=c.vocab - 3, vision_end_token_id=c.vocab - 4,
                          tie_word_embeddings=False))


def shape_of(c: Case):
    from qilin_lite.families import family_of_config
    from qilin_lite.plan import count_parameters, llava_config
    from qilin_lite.plan.native import native_shape

    if c.family == "llava":
        return count_parameters(llava_config(VISION, llm_dict(c)))
    config = native_config(c)
    return native_shape(config, family_of_config(config), NATIVE_IMAGE)[0]


def predict(c: Case) -> dict:
    from qilin_lite.plan import Settings, estimate

    shape = shape_of(c)
    s = Settings(mode=c.mode, per_device_batch=c.batch, global_batch=c.batch * c.accumulation, max_length=c.seq,
                 gradient_checkpointing=c.checkpointing, dtype="bfloat16" if c.bf16 else "float32",
                 mixed_precision=c.bf16, lora_r=c.lora_r,
                 attn="sdpa", padding=c.padding, device="cpu")
    est = estimate(shape, s)
    phases = dict(est.phases)
    phases["rest of backward"] = max(phases.pop(k) for k in ("top layer's backward", "bottom layer's backward",
                                                              "end of backward"))
    return {"total": est.total, "phase": est.peak_phase, "components": est.components, "phases": phases}


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _live_state(model, optimizer) -> int:
    """Bytes of every persistent tensor: parameters, buffers, bitsandbytes quantization state, optimizer state."""
    import torch

    tensors = list(model.parameters()) + list(model.buffers())
    for mod in model.modules():
        qs = getattr(getattr(mod, "weight", None), "quant_state", None)
        if qs is not None:
            tensors += [t for t in (qs.absmax, qs.code, qs.offset) if torch.is_tensor(t)]
            if qs.state2 is not None:
                tensors += [t for t in (qs.state2.absmax, qs.state2.code) if torch.is_tensor(t)]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    return _storage_bytes(tensors)


HEAD_BACKWARD = "autograd::engine::evaluate_function: ChunkedLogProbFunctionBackward"


def _phase_windows(events) -> dict[str, list[tuple[int, int]]]:
    """Time spans of the phases the planner names: the LM head's backward (the planner's "start of backward"), the
    rest of the backward (its layers' backward and "end of backward") and the optimizer step."""
    ops = [(e.name(), e.start_ns(), e.end_ns()) for e in events if e.name() != "[memory]"]
    head = sorted((a, b) for n, a, b in ops if n == HEAD_BACKWARD)
    backward = sorted((a, b) for n, a, b in ops if n == "plan:backward")  # marked in `measure`
    steps = sorted((a, b) for n, a, b in ops if n.startswith("Optimizer.step#"))
    rest = [(h_end, next(b for a, b in backward if a <= h_start <= b)) for h_start, h_end in head]
    return {"start of backward": head, "rest of backward": rest, "optimizer step": steps}


def measure(c: Case) -> dict:
    """Train `c` for three steps; return persistent bytes, the measured steps' peak above them, and the time."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlavaForConditionalGeneration
    from trl.trainer.utils import add_fused_lm_head

    from qilin_lite.families import family_of_config
    from qilin_lite.model import load_vlm
    from qilin_lite.plan import llava_config
    from qilin_lite.train.stages import LoraSettings, configure

    t0 = time.time()
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("PLAN_THREADS", "2")))
    native = c.family != "llava"
    config = native_config(c) if native else llava_config(VISION, llm_dict(c))
    with tempfile.TemporaryDirectory() as tmp:
        if native:
            from transformers import Qwen2_5_VLForConditionalGeneration

            Qwen2_5_VLForConditionalGeneration(config).save_pretrained(tmp)
        else:
            LlavaForConditionalGeneration(config).save_pretrained(tmp)
        model = load_vlm(tmp, bits=4 if c.mode == "qlora" else None, dtype="bfloat16" if c.bf16 else "float32",
                           attn="sdpa")
        # the loaded weights may be views of the memory-mapped file; give them their own memory, as on a GPU
        for p in model.parameters():
            if p.__class__.__name__ != "Params4bit":
                p.data = p.data.clone()
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    family = family_of_config(config)
    model = configure(model, c.mode, LoraSettings(c.lora_r, 2 * c.lora_r, 0.05), gradient_checkpointing=c.checkpointing)
    for p in model.parameters():  # train.py: trained parameters of a quantized model stay fp32
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
    if c.checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)

    if native:
        grid = [1, NATIVE_IMAGE[0] // 14, NATIVE_IMAGE[1] // 14]
        n_img = grid[1] * grid[2] // 4
    else:
        n_img = (VISION["image_size"] // VISION["patch_size"]) ** 2
    ids = torch.randint(3, c.vocab - 4, (c.batch, c.seq))
    ids[:, 0] = 1
    ids[:, 1 : 1 + n_img] = config.image_token_id
    labels = ids.clone()
    labels[:, : 1 + n_img] = -100
    mask = torch.ones_like(ids)
    if c.padding:
        cut = c.seq - c.seq // 8
        mask[0, cut:] = 0
        labels[0, cut:] = -100
    if native:  # the processor's flattened patches (3 x 2 x 14 x 14 values each), the grid, the image marks
        extra = {"pixel_values": torch.randn(c.batch * grid[1] * grid[2], 3 * 2 * 14 * 14),
                 "image_grid_thw": torch.tensor([grid] * c.batch),
                 family.image_marks: (ids == config.image_token_id).long()}
    else:
        extra = {"pixel_values": torch.randn(c.batch, 3, VISION["image_size"], VISION["image_size"])}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=c.bf16)
    num_items = (labels[:, 1:] != -100).sum() * c.accumulation

    def step():
        for _ in range(c.accumulation):
            inputs = {"input_ids": ids, "attention_mask": mask, **extra, "labels": labels, "use_cache": False}
            with autocast:  # the Trainer's bf16 (accelerate's autocast)
                out = model(**inputs, fused_lm_head=True)  # trl's SFTTrainer.compute_loss
            loss = -out.log_probs.sum() / num_items
            _ = (out.label_mask.sum().item(), out.entropy.detach().sum().item(), out.is_top1.sum().item())
            del out, inputs
            with torch.profiler.record_function("plan:backward"):
                loss.backward()
            del loss
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        model.zero_grad(set_to_none=True)

    t1 = time.time()
    step()
    t2 = time.time()
    persistent = _live_state(model, optimizer)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    windows = _phase_windows(events)
    running, peak, phase_peak = 0, 0, dict.fromkeys(windows, 0)
    for e in memory:
        running += e.nbytes()
        peak = max(peak, running)
        for name, spans in windows.items():
            if any(a <= e.start_ns() <= b for a, b in spans):
                phase_peak[name] = max(phase_peak[name], running)
    t3 = time.time()
    return {"persistent": persistent, "step_peak": peak, "total": persistent + peak,
            "phases": {k: persistent + v for k, v in phase_peak.items() if v}, "seconds": round(t3 - t0, 1),
            "seconds_setup_warmup_measure": [round(t1 - t0, 1), round(t2 - t1, 1), round(t3 - t2, 1)]}


def run_case(name: str) -> dict:
    """Measure one case in a fresh process (clean allocator, no state from other cases)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, __file__, "--case", name, "--json"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    if out.returncode:
        raise RuntimeError(f"case {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def one(name: str) -> dict:
    c = BY_NAME[name]
    m = measure(c)
    p = predict(c)
    return {"case": asdict(c), "measured": m, "predicted": p, "ratio": p["total"] / m["total"]}


def table(names: list[str]) -> list[dict]:
    MiB = 2**20
    rows = []
    print(f"{'case':22} {'mode':5} {'ckpt':4} {'precision':9} {'predicted MiB':>13} {'measured MiB':>12} {'ratio':>6}"
          f"   {'after LM head backward: pred / meas MiB':>40} {'ratio':>6}  {'seconds':>7}")
    for name in names:
        r = run_case(name)
        m, p, c = r["measured"], r["predicted"], r["case"]
        rest_p, rest_m = p["phases"]["rest of backward"], m["phases"]["rest of backward"]
        print(f"{name:22} {c['mode']:5} {'yes' if c['checkpointing'] else 'no':4} "
              f"{'bf16+ac' if c['bf16'] else 'fp32':9} {p['total'] / MiB:13.1f} {m['total'] / MiB:12.1f} "
              f"{r['ratio']:6.3f}   {rest_p / MiB:31.1f} / {rest_m / MiB:6.1f} {rest_p / rest_m:6.3f}  "
              f"{m['seconds']:7.1f}", flush=True)
        rows.append(r)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst peak error: {100 * worst:.1f}% over {len(rows)} cases")
    return rows


PAPER = [
    ("stage 1, align, 8 GPUs, ZeRO-2", ["recipes/qilin-med-vl/align.yaml", "--gpus", "8", "--gpu-memory", "80GiB"]),
    ("stage 2, full, 8 GPUs, ZeRO-3", ["recipes/qilin-med-vl/tune-full.yaml", "--gpus", "8", "--gpu-memory", "80GiB"]),
    ("stage 2, QLoRA, one 24 GB GPU", ["recipes/qilin-med-vl/tune-qlora.yaml", "--gpus", "1", "--gpu-memory", "24GiB"]),
]


def paper() -> None:
    for title, args in PAPER:
        print(f"### {title}\n\n$ qilin-lite plan {' '.join(args)}\n", flush=True)
        out = subprocess.run([sys.executable, "-m", "qilin_lite", "plan", *args], capture_output=True, text=True, cwd=ROOT)
        print(out.stdout + out.stderr)


def head_temps() -> None:
    """The CPU constants of trl's chunked LM head (`CPU_TILE_TEMPS`): fp32 tokens x vocabulary temporaries alive at its
    forward and backward peaks, beside its product buffer (tokens x 32768) and its fp32 gradients."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    h = 256
    for tokens, vocab in ((1024, 2000), (2048, 8000), (2048, 16000)):
        hidden = torch.randn(tokens, h, requires_grad=True)
        weight = torch.randn(vocab, h)
        targets = torch.randint(0, vocab, (tokens,))
        peaks = []
        for backward in (False, True):
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                lp = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0,
                                                  ("log_probs", "entropy", "is_top1"))[0]
                if backward:
                    (-lp.sum()).backward()
            running = peak = 0
            for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                            key=lambda e: e.start_ns()):
                running += e.nbytes()
                peak = max(peak, running)
            del lp
            hidden.grad = None
            extra = tokens * 32768 * 4 + (4 * tokens * h if backward else 0)  # product buffer, gradient
            peaks.append((peak - extra) / (tokens * vocab * 4))
        print(f"tokens {tokens:5} vocab {vocab:6}: forward {peaks[0]:.2f}, backward {peaks[1]:.2f} tiles")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(BY_NAME))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--paper", action="store_true")
    ap.add_argument("--head", action="store_true", help="measure the CPU constants of trl's chunked LM head")
    args = ap.parse_args()
    if args.paper:
        paper()
    elif args.head:
        head_temps()
    elif args.case:
        r = one(args.case)
        print(json.dumps(r) if args.json else json.dumps(r, indent=1))
    else:
        table([c.name for c in CASES + BF16_CASES + NATIVE_CASES])


if __name__ == "__main__":
    main()
