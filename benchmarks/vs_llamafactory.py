"""qilin-lite against LLaMA-Factory on identical work: samples per second of a full fine-tune (stage 2) of the same
small Llava on the same records, each tool from its own command line, rounds interleaved.

In:  LLaMA-Factory in its own environment (`--lf-python`; it is not a qilin-lite dependency), synth.py's small Llava
     and 480 ChiMed-VL-shaped single-turn records.
Out: per round and run, the Trainer's own `train_samples_per_second` and `train_loss` (both tools run transformers'
     Trainer, so the same clock: the training loop, setup excluded), the medians and the per-round ratios; JSON in
     `OUT/results.json`.

Same work on both sides: the model directory, records and images; full fine-tune with the vision tower frozen;
LLaVA's vicuna_v1 prompt (LLaMA-Factory's `llava` template) with only the replies and their `</s>` supervised (34 of
142-143 positions on the first record on both sides); batch 8, no accumulation, lr 2e-5 cosine with 3% warmup,
fp32, sdpa, fused AdamW, no data workers, one epoch, seed 42, one thread each (OMP_NUM_THREADS=1). Orders: each
tool's default (random) and length-grouped (qilin-lite `data.group_by_length`; LLaMA-Factory
`train_sampling_strategy: group_by_length`, transformers' LengthGroupedSampler).

LLaMA-Factory 0.9.5 here: `python3 -m venv V; V/bin/pip install torch==2.13.0; V/bin/pip install --no-deps
llamafactory==0.9.5`, then its non-UI requirements (transformers 5.6.0, trl 0.24.0, peft 0.18.1, accelerate 1.11.0,
datasets 4.0.0, torchdata 0.11.0, tyro<0.9, omegaconf, fire, einops, sentencepiece, tiktoken, scipy, pandas, ...);
torchaudio, which it imports at module level and which has no wheel for this torch, is a stub this script writes.

    python benchmarks/vs_llamafactory.py --lf-python V/bin/python [--rounds 3] [--out /tmp/vs-lf]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("lf-random", "lf-grouped", "ours-random", "ours-grouped")


def prepare(out: Path, n: int) -> dict:
    """The base (cached), the records in qilin-lite's and LLaMA-Factory's layouts, LLaMA-Factory's config."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.synth import ModelSize, build_base, write_records
    from qilin_lite.model import load_tokenizer

    base = build_base(Path.home() / ".cache" / "qilin-lite" / "bench-base", ModelSize())
    paths = write_records(out / "data", load_tokenizer(str(base)), n, ModelSize().image_size, seed=0)
    rows = json.loads(paths["tune"].read_text(encoding="utf-8"))
    lf_rows = [{"conversations": r["conversations"], "images": [str(paths["images"] / r["image"])]} for r in rows]
    (out / "data" / "lf_tune.json").write_text(json.dumps(lf_rows, ensure_ascii=False), encoding="utf-8")
    (out / "data" / "dataset_info.json").write_text(json.dumps({"bench": {
        "file_name": "lf_tune.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "images": "images"}}}), encoding="utf-8")
    stub = out / "stub" / "torchaudio"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text('"""stub: LLaMA-Factory imports torchaudio; no audio is used"""\n'
                                      '__version__ = "2.13.0"\n')
    return {"base": base, "tune": paths["tune"], "images": paths["images"], "stub": stub.parent}


def lf_config(p: dict, out: Path, grouped: bool) -> Path:
    cfg = {
        "model_name_or_path": str(p["base"]), "stage": "sft", "do_train": True, "finetuning_type": "full",
        "freeze_vision_tower": True, "freeze_multi_modal_projector": False, "dataset": "bench",
        "dataset_dir": str(p["tune"].parent), "template": "llava", "cutoff_len": 2048, "overwrite_cache": True,
        "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "output_dir": str(out), "logging_steps": 10,
        "save_strategy": "no", "overwrite_output_dir": True, "report_to": "none", "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1, "learning_rate": 2.0e-5, "num_train_epochs": 1.0,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.03, "optim": "adamw_torch_fused", "bf16": False,
        "fp16": False, "use_cpu": True, "seed": 42,
        **({"train_sampling_strategy": "group_by_length"} if grouped else {}),
    }
    path = out.parent / f"{out.name}.yaml"  # YAML holds JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def ours_args(p: dict, out: Path, grouped: bool) -> list[str]:
    sets = {"train.per_device_batch": 8, "train.global_batch": 8, "model.dtype": "float32", "model.attn": "sdpa",
            "train.bf16": "false", "train.tf32": "false", "train.gradient_checkpointing": "false",
            "train.deepspeed": "none", "data.num_workers": 0, "train.optim": "adamw_torch_fused",
            "data.group_by_length": str(grouped).lower(), "train.save_steps": 100000, "train.logging_steps": 10,
            "train.seed": 42}
    args = ["tune", str(ROOT / "recipes" / "qilin-med-vl" / "tune-full.yaml"), "--full", "--model", str(p["base"]),
            "--data", str(p["tune"]), "--image-folder", str(p["images"]), "--out", str(out), "--overwrite"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def trainer_metrics(log: str) -> dict:
    """The Trainer's end-of-training dict, as both tools print it."""
    for line in reversed(log.splitlines()):
        if "'train_samples_per_second'" in line:
            d = eval(line[line.index("{"):line.rindex("}") + 1], {"__builtins__": {}})  # noqa: S307 - a printed dict
            return {"samples_per_s": float(d["train_samples_per_second"]), "loss": float(d["train_loss"]),
                    "runtime_s": float(d["train_runtime"])}
    raise RuntimeError("no train metrics in the output:\n" + log[-3000:])


def run(name: str, p: dict, out: Path, lf_python: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    grouped = name.endswith("grouped")
    target = out / name
    if name.startswith("lf"):
        env["PYTHONPATH"] = str(p["stub"])
        cmd = [str(Path(lf_python).with_name("llamafactory-cli")), "train", str(lf_config(p, target, grouped))]
    else:
        cmd = [str(Path(sys.executable).with_name("qilin-lite")), *ours_args(p, target, grouped)]
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {**trainer_metrics(done.stdout + done.stderr), "wall_s": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lf-python", required=True, help="python of an environment with llamafactory 0.9.5")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--records", type=int, default=480)
    ap.add_argument("--out", type=Path, default=Path("/tmp/vs-llamafactory"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    p = prepare(args.out, args.records)
    rounds = []
    for r in range(args.rounds):
        rounds.append({name: run(name, p, args.out / f"r{r}", args.lf_python) for name in RUNS})
        print(f"round {r + 1}: " + ", ".join(f"{k} {v['samples_per_s']:.2f}/s" for k, v in rounds[-1].items()),
              flush=True)
    med = {k: statistics.median(x[k]["samples_per_s"] for x in rounds) for k in RUNS}
    ratios = {f"ours-grouped / {k}": [round(x["ours-grouped"]["samples_per_s"] / x[k]["samples_per_s"], 3)
                                      for x in rounds] for k in ("lf-random", "lf-grouped")}
    ratios["ours-random / lf-random"] = [round(x["ours-random"]["samples_per_s"] / x["lf-random"]["samples_per_s"], 3)
                                         for x in rounds]
    print("\n| run | samples/s (median) | train loss (round 1) |\n|---|---|---|")
    for k in RUNS:
        print(f"| {k} | {med[k]:.2f} | {rounds[0][k]['loss']:.4f} |")
    for k, v in ratios.items():
        print(f"{k}: median {statistics.median(v):.2f}x, rounds {v}")
    result = {"rounds": rounds, "median_samples_per_s": med, "ratios": ratios}
    (args.out / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
