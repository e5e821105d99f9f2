"""Cost per step of `prefer` (DPO) and `reinforce` (GRPO) against trl's own example scripts, same model and data.

In:  a small Llava (harness/synth.py), the demo's closed questions and preference pairs (qilin_lite/demo/data.py).
Out: per side and round, seconds per optimizer step (median, the first step left out as warm-up), setup seconds
     (dataset preparation and trainer construction) and, for GRPO, the completion tokens sampled per step; the
     stock / ours ratios; results/after_sft_vs_trl.json and the section of benchmarks/README.md between its markers.

- DPO, ours:  `run_prefer` (pairs encoded by the family's template, trl's DPOTrainer on them).
  DPO, stock: trl's examples/scripts/dpo_vlm.py: `DPOTrainer(model, None, processing_class=processor, peft_config)`
              on a prompt / chosen / rejected + images dataset, the processor's chat template set to the same
              template's Jinja (so both see the same prompt text), trl's own tokenization and collator.
- GRPO, ours:  `run_reinforce` (rollouts from chat's prompt, eval's scoring as the reward, Trainer.compute_loss).
  GRPO, stock: trl's examples/scripts/grpo_vlm.py: `GRPOTrainer(model, reward_funcs, train_dataset=prompt + image)`
               with the same reward (eval's score_item), G, temperature, KL weight, loss type and lengths.

Both sides get the same model object (`load_vlm` + `configure`: the same LoRA on the LLM, projector frozen),
batch, learning rate, schedule, seed and fp32 on the CPU. The sides alternate within each round.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.harness.probe import Probe, instrumented  # noqa: E402

BEGIN, END = "<!-- after_sft_vs_trl: begin -->", "<!-- after_sft_vs_trl: end -->"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/qilin-after-sft-bench"))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dpo-steps", type=int, default=8)
    p.add_argument("--grpo-steps", type=int, default=5)
    p.add_argument("--pairs-per-step", type=int, default=8)
    p.add_argument("--questions-per-step", type=int, default=4)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-completion", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="toy sizes: checks the code path, writes nothing")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.dpo_steps, a.grpo_steps, a.pairs_per_step, a.questions_per_step = 1, 2, 2, 2, 2
        a.generations, a.max_completion = 2, 4
    return a


def prepare(work: Path, a) -> dict:
    from benchmarks.harness.synth import ModelSize, build_base
    from qilin_lite.demo.data import DemoDataSpec, make_demo_data, make_demo_pairs

    base = build_base(work / "synth", ModelSize())
    n = max(a.pairs_per_step * (a.dpo_steps + 1), a.questions_per_step * (a.grpo_steps + 1))
    paths = make_demo_data(work / "data", DemoDataSpec(n_align=1, n_tune=n, n_heldout=1, n_questions=n))
    pairs = make_demo_pairs(paths["tune"], work / "data" / "pairs.jsonl")
    return {"base": base, "pairs": pairs, "questions": paths["questions"], "images": paths["images"]}


def recipe_for(stage: str, d: dict, out: Path, a):
    from qilin_lite.config import REPO_RECIPES, load_recipe

    if stage == "prefer":
        batch, steps, data = a.pairs_per_step, a.dpo_steps, d["pairs"]
        extra = []
    else:
        batch, steps, data = a.questions_per_step, a.grpo_steps, d["questions"]
        extra = [f"train.num_generations={a.generations}", f"train.max_completion_length={a.max_completion}"]
    overrides = ["train.mode=lora", f"train.per_device_batch={batch}", f"train.global_batch={batch}",
                 f"train.max_steps={steps}", "train.logging_steps=1", "train.save_steps=1000000", "train.seed=0",
                 "train.report_to=none", *extra]
    return load_recipe(REPO_RECIPES / "demo" / f"{stage}.yaml", overrides, stage=stage, output_dir=str(out),
                       **{"model.base": str(d["base"]), "data.train": str(data), "data.image_folder": str(d["images"])})


def stock_model(recipe):
    from qilin_lite.model import load_vlm
    from qilin_lite.train.stages import LoraSettings, configure

    tr = recipe.train
    model = load_vlm(str(recipe.model.base), dtype="float32", attn="sdpa")
    model.config.use_cache = False
    return configure(model, "lora", LoraSettings(tr.lora_r, tr.lora_alpha, tr.lora_dropout), projector_trains=False)


def stock_processor(recipe):
    from transformers import AutoProcessor

    from qilin_lite.families import chat_template_jinja, get_template

    processor = AutoProcessor.from_pretrained(str(recipe.model.base))
    processor.chat_template = chat_template_jinja(get_template(recipe.template))  # the same prompt text as ours
    return processor


def common_args(recipe) -> dict:
    tr = recipe.train
    return dict(output_dir=recipe.output_dir, per_device_train_batch_size=tr.per_device_batch,
                gradient_accumulation_steps=1, learning_rate=tr.lr, max_steps=tr.max_steps,
                lr_scheduler_type=tr.scheduler, warmup_steps=0, max_grad_norm=tr.max_grad_norm, optim=tr.optim,
                bf16=False, gradient_checkpointing=False, logging_steps=1, save_steps=1000000, seed=tr.seed,
                report_to="none", dataloader_num_workers=0, use_cpu=True)


# ---------------------------------------------------------------- DPO
def dpo_ours(d, out, a) -> dict:
    from qilin_lite.prefer.run import PreferTrainer, run_prefer

    probe, t0 = Probe(), time.perf_counter()
    run_prefer(recipe_for("prefer", d, out, a), trainer_cls=instrumented(PreferTrainer, probe))
    return result(probe, t0)


def dpo_stock(d, out, a) -> dict:
    import datasets
    from PIL import Image
    from trl import DPOConfig, DPOTrainer

    from qilin_lite.prefer.pairs import read_pairs

    recipe = recipe_for("prefer", d, out, a)
    t0 = time.perf_counter()
    rows = {"prompt": [], "chosen": [], "rejected": [], "images": []}
    for pair in read_pairs(recipe.data.train, recipe.data.image_folder):
        prompt, first = [], True
        for turn in pair.prompt:  # trl places the image where the content says: "<image>" out of the text
            text = turn["content"].replace("<image>\n", "").replace("<image>", "")
            parts = [{"type": "text", "text": text}]
            if turn["role"] == "user" and first:
                parts, first = [{"type": "image"}, *parts], False
            prompt.append({"role": turn["role"], "content": parts})
        rows["prompt"].append(prompt)
        rows["chosen"].append([{"role": "assistant", "content": [{"type": "text", "text": pair.chosen}]}])
        rows["rejected"].append([{"role": "assistant", "content": [{"type": "text", "text": pair.rejected}]}])
        rows["images"].append([Image.open(pair.images[0]).convert("RGB")])
    ds = datasets.Dataset.from_dict(rows)
    tr = recipe.train
    args = DPOConfig(**common_args(recipe), beta=recipe.beta, loss_type=[tr.dpo_loss], max_length=recipe.data.max_length)
    probe = Probe()
    trainer = instrumented(DPOTrainer, probe)(model=stock_model(recipe), ref_model=None, args=args, train_dataset=ds,
                                              processing_class=stock_processor(recipe))
    trainer.train()
    return result(probe, t0)


# ---------------------------------------------------------------- GRPO
def grpo_ours(d, out, a) -> dict:
    from qilin_lite.reinforce.run import ReinforceTrainer, run_reinforce

    probe, t0 = Probe(), time.perf_counter()
    run_reinforce(recipe_for("reinforce", d, out, a), trainer_cls=instrumented(ReinforceTrainer, probe))
    rows = [h for h in json.loads((out / "log_history.json").read_text()) if "completion_length" in h]
    return {**result(probe, t0), "completion_tokens_per_answer": statistics.mean(h["completion_length"] for h in rows)}


def grpo_stock(d, out, a) -> dict:
    import datasets
    from PIL import Image
    from trl import GRPOConfig, GRPOTrainer

    from qilin_lite.eval.benchmarks import load_eval_items
    from qilin_lite.eval.metrics import score_item
    from qilin_lite.eval.prompt import format_prompt

    recipe = recipe_for("reinforce", d, out, a)
    tr = recipe.train
    t0 = time.perf_counter()
    items = load_eval_items(recipe.data.train, "llava", recipe.data.image_folder)
    ds = datasets.Dataset.from_dict({
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": format_prompt(it)}]}]
                   for it in items],
        "image": [Image.open(it.image).convert("RGB") for it in items],
        "index": list(range(len(items)))})

    def eval_reward(prompts, completions, index, **_):  # the same rule ours rewards with
        return [float(score_item(items[i], c[0]["content"] if isinstance(c, list) else c)["correct"])
                for i, c in zip(index, completions)]

    args = GRPOConfig(**{**common_args(recipe), "per_device_train_batch_size": tr.per_device_batch * tr.num_generations},
                      num_generations=tr.num_generations, max_completion_length=tr.max_completion_length,
                      temperature=tr.temperature, top_p=1.0, beta=recipe.beta, loss_type=tr.grpo_loss,
                      scale_rewards=tr.scale_rewards, num_iterations=1)
    probe = Probe()
    trainer = instrumented(GRPOTrainer, probe)(model=stock_model(recipe), reward_funcs=[eval_reward], args=args,
                                               train_dataset=ds, processing_class=stock_processor(recipe))
    trainer.train()
    rows = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    return {**result(probe, t0),
            "completion_tokens_per_answer": statistics.mean(h["completions/mean_length"] for h in rows)}


def result(probe: Probe, t0: float) -> dict:
    steps = probe.step_s[1:] if len(probe.step_s) > 1 else probe.step_s
    total = time.perf_counter() - t0
    return {"s_per_step": statistics.median(steps), "steps": len(probe.step_s), "loop_s": round(probe.loop_s, 2),
            "setup_s": round(total - probe.loop_s, 2),
            # DPO: the real (unpadded) tokens of its batches, so equal work shows as equal numbers
            "real_tokens_per_step": probe.real_tokens / max(len(probe.step_s), 1)}


def machine() -> dict:
    import torch
    import transformers
    import trl

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def readme_section(res: dict) -> str:
    a = res["settings"]
    lines = [BEGIN, "", "| stage | ours s/step | trl example s/step | trl / ours | ours setup s | trl setup s | "
             "work (ours / trl) |", "|---|---|---|---|---|---|---|"]
    for stage in ("dpo", "grpo"):
        rounds = res[stage]
        o = statistics.median(r["ours"]["s_per_step"] for r in rounds)
        s = statistics.median(r["stock"]["s_per_step"] for r in rounds)
        ratios = ", ".join(f"{r['stock']['s_per_step'] / r['ours']['s_per_step']:.2f}" for r in rounds)
        tok = (f"{statistics.mean(r['ours']['real_tokens_per_step'] for r in rounds):.0f} / "
               f"{statistics.mean(r['stock']['real_tokens_per_step'] for r in rounds):.0f} tokens a step")
        if stage == "grpo":
            tok = (f"{statistics.mean(r['ours']['completion_tokens_per_answer'] for r in rounds):.1f} / "
                   f"{statistics.mean(r['stock']['completion_tokens_per_answer'] for r in rounds):.1f} tokens an answer")
        lines.append(f"| {stage.upper()} | {o:.3f} | {s:.3f} | {s / o:.2f} (rounds: {ratios}) | "
                     f"{statistics.median(r['ours']['setup_s'] for r in rounds):.1f} | "
                     f"{statistics.median(r['stock']['setup_s'] for r in rounds):.1f} | {tok} |")
    m = res["machine"]
    lines += ["", f"DPO: {a['pairs_per_step']} pairs a step, {a['dpo_steps']} steps; GRPO: {a['questions_per_step']} "
              f"questions x {a['generations']} answers a step, at most {a['max_completion']} tokens each, "
              f"{a['grpo_steps']} steps; LoRA, fp32, {res['rounds']} rounds, medians with the first step left out. "
              f"torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, {m['threads']} threads.", "", END]
    return "\n".join(lines)


def write_readme(section: str, path: Path = HERE / "README.md") -> None:
    text = path.read_text(encoding="utf-8")
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv=None) -> dict:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    import shutil

    a.work.mkdir(parents=True, exist_ok=True)
    d = prepare(a.work, a)
    res = {"machine": machine(), "rounds": a.rounds,
           "settings": {k: getattr(a, k) for k in ("dpo_steps", "grpo_steps", "pairs_per_step", "questions_per_step",
                                                   "generations", "max_completion")}, "dpo": [], "grpo": []}
    for r in range(a.rounds):
        for stage, ours, stock in (("dpo", dpo_ours, dpo_stock), ("grpo", grpo_ours, grpo_stock)):
            row = {}
            order = (("ours", ours), ("stock", stock)) if r % 2 == 0 else (("stock", stock), ("ours", ours))
            for side, fn in order:
                out = a.work / f"{stage}-{side}-{r}"
                shutil.rmtree(out, ignore_errors=True)
                row[side] = fn(d, out, a)
                print(f"round {r} {stage} {side}: {json.dumps(row[side])}", flush=True)
            res[stage].append(row)
    section = readme_section(res)
    print(section)
    if not a.quick:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "after_sft_vs_trl.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
        write_readme(section)
    return res


if __name__ == "__main__":
    main()
