"""qilin-lite against LLaMA-Factory on identical work: samples per second of the same training modes (full
fine-tune, align, LoRA, QLoRA) of the same small Llava on the same records, each tool from its own command line,
rounds interleaved, and where each tool's step spends its time.

In:  LLaMA-Factory in its own environment (`--lf-python`; it is not a qilin-lite dependency), harness/synth.py's
     small Llava, 480 ChiMed-VL-shaped single-turn records (tune) and the first 96 of as many captions and contexts
     (align).
Out: per round and run, the Trainer's own `train_samples_per_second` and `train_loss` (both tools run transformers'
     Trainer, so the same clock: the training loop, setup excluded), the trainable parameter count each tool
     reports, a step profile (harness/probe_site/sitecustomize.py: data wait, forward + loss, backward, optimizer,
     the rest, median seconds per step, the same code timing both tools), the medians and the per-round ratios;
     JSON in `OUT/results.json` and benchmarks/results/vs_llamafactory.json (not with `--no-write`).

Same work on both sides: the model directory, records and images; the vision tower frozen; LLaVA's vicuna_v1
prompt (LLaMA-Factory's `llava` template) with only the replies and their `</s>` supervised (34 of 142-143 positions
on the first tune record on both sides); batch 8, no accumulation, no activation checkpointing (LLaMA-Factory's
default is on: `disable_gradient_checkpointing` turns it off), no gradient clipping (the paper recipes' and
LLaVA's zero*.json), cosine with 3% warmup, fp32, sdpa, fused AdamW, no data workers, one epoch, seed 42, one
thread each (OMP_NUM_THREADS=1). Modes:
  full   stage 2, LLM + projector, lr 2e-5 (qilin-lite `tune --full`; LF `finetuning_type: full`)
  align  projector only on captions, lr 1e-3, vicuna_v1 prompt on both sides (qilin-lite `align` with
         `data.template=vicuna_v1`; LF `freeze_language_model`)
  lora   LoRA r 16 / alpha 32 / dropout 0.05 on every linear layer of the LLM, projector fully trained, lr 2e-4
         (qilin-lite `tune --lora`, projector_lr = lr; LF `lora_target: all`, `additional_target:
         multi_modal_projector`)
  qlora  the same on a 4-bit NF4 LLM with double quantization (qilin-lite `tune --qlora`; LF `quantization_bit: 4`)
Orders: length-grouped on both sides for every mode (qilin-lite `data.group_by_length`; LLaMA-Factory
`train_sampling_strategy: group_by_length`, transformers' LengthGroupedSampler: the same batches); the full mode
also each tool's default order (random).

LLaMA-Factory 0.9.5 here: `python3 -m venv V; V/bin/pip install torch==2.13.0; V/bin/pip install --no-deps
llamafactory==0.9.5`, then its non-UI requirements (transformers 5.6.0, trl 0.24.0, peft 0.18.1, accelerate 1.11.0,
datasets 4.0.0, torchdata 0.11.0, tyro<0.9, omegaconf, fire, einops, sentencepiece, tiktoken, scipy, pandas, ...,
and bitsandbytes for qlora); torchaudio, which it imports at module level and which has no wheel for this torch, is
a stub this script writes.

    python benchmarks/vs_llamafactory.py --lf-python V/bin/python [--rounds 3] [--modes full align lora qlora]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("full", "align", "lora", "qlora")
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}


def runs_of(mode: str) -> tuple[str, ...]:
    orders = ("random", "grouped") if mode == "full" else ("grouped",)
    return tuple(f"{mode}/{side}-{order}" for order in orders for side in ("lf", "ours"))


def prepare(out: Path, n: int, n_align: int) -> dict:
    """The base (cached), the records in qilin-lite's and LLaMA-Factory's layouts, the torchaudio stub."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness.synth import ModelSize, build_base, write_records
    from qilin_lite.model import load_tokenizer

    base = build_base(Path.home() / ".cache" / "qilin-lite" / "bench-base", ModelSize())
    paths = write_records(out / "data", load_tokenizer(str(base)), n, ModelSize().image_size, seed=0)
    info = {}
    for stage, keep in (("tune", n), ("align", n_align)):
        rows = json.loads(paths[stage].read_text(encoding="utf-8"))[:keep]
        if stage == "align":  # qilin-lite reads the same subset
            paths["align"] = out / "data" / "align_subset.json"
            paths["align"].write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        lf_rows = [{"conversations": r["conversations"], "images": [str(paths["images"] / r["image"])]} for r in rows]
        (out / "data" / f"lf_{stage}.json").write_text(json.dumps(lf_rows, ensure_ascii=False), encoding="utf-8")
        info[stage] = {"file_name": f"lf_{stage}.json", "formatting": "sharegpt",
                       "columns": {"messages": "conversations", "images": "images"}}
    (out / "data" / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    stub = out / "stub" / "torchaudio"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text('"""stub: LLaMA-Factory imports torchaudio; no audio is used"""\n'
                                      '__version__ = "2.13.0"\n')
    return {"base": base, "data": out / "data", "tune": paths["tune"], "align": paths["align"],
            "images": paths["images"], "stub": stub.parent}


def lf_config(p: dict, out: Path, mode: str, grouped: bool) -> Path:
    cfg = {
        "model_name_or_path": str(p["base"]), "stage": "sft", "do_train": True, "finetuning_type": "full",
        "freeze_vision_tower": True, "freeze_multi_modal_projector": False, "dataset": "tune",
        "dataset_dir": str(p["data"]), "template": "llava", "cutoff_len": 2048, "overwrite_cache": True,
        "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "output_dir": str(out), "logging_steps": 10,
        "save_strategy": "no", "overwrite_output_dir": True, "report_to": "none", "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1, "learning_rate": 2.0e-5, "num_train_epochs": 1.0, "max_grad_norm": 0.0,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.03, "optim": "adamw_torch_fused", "bf16": False,
        "fp16": False, "use_cpu": True, "seed": 42,
        "disable_gradient_checkpointing": True,  # LLaMA-Factory checkpoints by default; qilin-lite's runs here do not
        **({"train_sampling_strategy": "group_by_length"} if grouped else {}),
    }
    if mode == "align":
        cfg.update(dataset="align", freeze_language_model=True, learning_rate=1.0e-3)
    if mode in ("lora", "qlora"):
        cfg.update(finetuning_type="lora", lora_rank=LORA["r"], lora_alpha=LORA["alpha"],
                   lora_dropout=LORA["dropout"], lora_target="all", additional_target="multi_modal_projector",
                   learning_rate=2.0e-4)
    if mode == "qlora":
        cfg.update(quantization_bit=4, quantization_type="nf4", double_quantization=True)
    path = out.parent / f"{out.name}.yaml"  # YAML holds JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def ours_args(p: dict, out: Path, mode: str, grouped: bool) -> list[str]:
    sets = {"train.per_device_batch": 8, "train.global_batch": 8, "model.dtype": "float32", "model.attn": "sdpa",
            "train.bf16": "false", "train.tf32": "false", "train.gradient_checkpointing": "false",
            "train.deepspeed": "none", "data.num_workers": 0, "train.optim": "adamw_torch_fused",
            "train.max_grad_norm": 0, "data.group_by_length": str(grouped).lower(), "train.save_steps": 100000,
            "train.logging_steps": 10, "train.seed": 42}
    recipes = ROOT / "recipes" / "qilin-med-vl"
    if mode == "align":
        cmd = ["align", str(recipes / "align.yaml")]
        sets["data.template"] = "vicuna_v1"
    else:
        cmd = ["tune", str(recipes / f"tune-{'full' if mode == 'full' else mode}.yaml"), f"--{mode}"]
    if mode in ("lora", "qlora"):
        sets.update({"train.lora_r": LORA["r"], "train.lora_alpha": LORA["alpha"],
                     "train.lora_dropout": LORA["dropout"], "train.projector_lr": 2.0e-4})
    args = [*cmd, "--model", str(p["base"]), "--data", str(p["align" if mode == "align" else "tune"]),
            "--image-folder", str(p["images"]), "--out", str(out), "--overwrite"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def trainer_metrics(log: str) -> dict:
    """The Trainer's end-of-training dict, as both tools print it, and the trainable parameter count they log."""
    trainable = re.findall(r"trainable param(?:s|eters): ([\d,]+)", log)
    for line in reversed(log.splitlines()):
        if "'train_samples_per_second'" in line:
            d = eval(line[line.index("{"):line.rindex("}") + 1], {"__builtins__": {}})  # noqa: S307 - a printed dict
            return {"samples_per_s": float(d["train_samples_per_second"]), "loss": float(d["train_loss"]),
                    "runtime_s": float(d["train_runtime"]),
                    "trainable": int(trainable[-1].replace(",", "")) if trainable else None}
    raise RuntimeError("no train metrics in the output:\n" + log[-3000:])


def run(name: str, p: dict, out: Path, lf_python: str) -> dict:
    mode, rest = name.split("/")
    side, order = rest.split("-")
    target = out / name.replace("/", "-")
    probe = target.parent / f"{target.name}.probe.json"
    probe.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "QL_PROBE": str(probe),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks" / "harness" / "probe_site"),
                                          *([str(p["stub"])] if side == "lf" else [])])}
    if side == "lf":
        cmd = [str(Path(lf_python).with_name("llamafactory-cli")), "train",
               str(lf_config(p, target, mode, order == "grouped"))]
    else:
        cmd = [str(Path(sys.executable).with_name("qilin-lite")), *ours_args(p, target, mode, order == "grouped")]
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    prof = json.loads(probe.read_text(encoding="utf-8")) if probe.exists() else None
    return {**trainer_metrics(done.stdout + done.stderr), "wall_s": round(time.time() - t0, 1), "profile": prof}


def ratio_table(rounds: list[dict], names: list[str]) -> tuple[dict, list[str]]:
    med = {k: statistics.median(x[k]["samples_per_s"] for x in rounds) for k in names}
    pairs = []
    for mode in MODES:
        for order in ("grouped", "random"):
            ours, lf = f"{mode}/ours-{order}", f"{mode}/lf-{order}"
            if ours in names and lf in names:
                pairs.append((ours, lf))
    if "full/ours-grouped" in names and "full/lf-random" in names:
        pairs.append(("full/ours-grouped", "full/lf-random"))
    ratios = {f"{a} / {b}": [round(x[a]["samples_per_s"] / x[b]["samples_per_s"], 3) for x in rounds]
              for a, b in pairs}
    # the step profile's median step (robust to a slow first step or a stall) and the whole command's wall time
    step_ratios = {f"{a} / {b}": [round(x[b]["profile"]["median_s"]["step"] / x[a]["profile"]["median_s"]["step"], 3)
                                  for x in rounds] for a, b in pairs}
    wall_ratios = {f"{a} / {b}": [round(x[b]["wall_s"] / x[a]["wall_s"], 3) for x in rounds] for a, b in pairs}
    lines = ["| run | samples/s (median) | train loss (round 1) | trainable parameters |", "|---|---|---|---|"]
    for k in names:
        r = rounds[0][k]
        trainable = f"{r['trainable']:,}" if r["trainable"] else "?"
        lines.append(f"| {k} | {med[k]:.2f} | {r['loss']:.4f} | {trainable} |")
    lines += ["", "| speed ratio | samples/s (rounds) | by median step time (rounds) | by whole command's wall time "
              "(rounds) |", "|---|---|---|---|"]

    def fmt(v: list[float]) -> str:
        return f"**{statistics.median(v):.2f}x** ({', '.join(f'{x:.2f}' for x in v)})"

    lines += [f"| {k} | {fmt(v)} | {fmt(step_ratios[k])} | {fmt(wall_ratios[k])} |" for k, v in ratios.items()]
    lines += ["", "Step profile, median seconds per optimizer step (median over rounds):", "",
              "| run | data wait | forward + loss | backward | optimizer | other | step |", "|---|---|---|---|---|---|---|"]
    for k in names:
        profs = [x[k]["profile"]["median_s"] for x in rounds if x[k].get("profile")]
        if profs:
            m = {p: statistics.median(pr[p] for pr in profs) for p in profs[0]}
            lines.append(f"| {k} | " + " | ".join(f"{m[p]:.4f}" for p in
                                                   ("data", "forward_loss", "backward", "optimizer", "other", "step"))
                         + " |")
    return {"median_samples_per_s": med, "ratios": ratios, "step_ratios": step_ratios,
            "wall_ratios": wall_ratios}, lines


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lf-python", help="python of an environment with llamafactory 0.9.5 (required to run)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--records", type=int, default=480, help="tune records (full, lora, qlora)")
    ap.add_argument("--align-records", type=int, default=96,
                    help="captions for align (contexts run to 2048 tokens: ~1 sample/s here)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--out", type=Path, default=Path("/tmp/vs-llamafactory"))
    ap.add_argument("--table", type=Path, help="only print the tables of a results.json this script wrote")
    ap.add_argument("--no-write", action="store_true",
                    help="keep the JSON in OUT only: leave benchmarks/results/vs_llamafactory.json alone")
    args = ap.parse_args(argv)
    if args.table:
        saved = json.loads(args.table.read_text(encoding="utf-8"))
        print("\n".join(ratio_table(saved["rounds"], list(saved["rounds"][0]))[1]))
        return saved
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.lf_python:
        ap.error("--lf-python is required (an environment with llamafactory 0.9.5; see the docstring)")
    p = prepare(args.out, args.records, args.align_records)
    names = [n for m in args.modes for n in runs_of(m)]
    rounds = []
    for r in range(args.rounds):
        rounds.append({name: run(name, p, args.out / f"r{r}", args.lf_python) for name in names})
        print(f"round {r + 1}: " + ", ".join(f"{k} {v['samples_per_s']:.2f}/s" for k, v in rounds[-1].items()),
              flush=True)
    summary, lines = ratio_table(rounds, names)
    print("\n".join(lines))
    result = {"rounds": rounds, **summary, "table": lines}
    (args.out / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    if not args.no_write:
        from benchmarks.harness import RESULTS

        (RESULTS / "vs_llamafactory.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(f"wrote {RESULTS / 'vs_llamafactory.json'}")
    return result


if __name__ == "__main__":
    main()
