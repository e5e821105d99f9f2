"""The opt-in differences from the authors' settings, each measured against the authors' settings on the same data.

    python benchmarks/deviations_vs_authors.py           # ~6 min on 2 CPU cores; prints a table, writes
                                                         # results/deviations_vs_authors.json
    python benchmarks/deviations_vs_authors.py --quick   # ~1 min, toy sizes (numbers not meaningful)

One tiny Llava (the demo's stand-in: tiny CLIP + LLaMA with a SentencePiece tokenizer, so the authors' encoding is
the one used), one align run, then stage 2 `--full` from it, same seed and records each time:
- `authors`: the tune-full recipe's settings (random order, no packing, adamw_torch, no clipping, each micro-batch's
  own mean over GPUs and accumulation);
- one row per deviation, everything else equal: length grouping, packing, fused AdamW, trl's all-token loss mean,
  gradient clipping at 1.0; and the authors' settings with another seed, the noise any change in order brings.
Reported: the training loss curve's mean absolute difference from the authors' row (first and last quarter of the
steps), the final training loss, and the held-out loss over the supervised reply tokens (same eval records for all).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "authors": [],
    "authors, seed 43": ["train.seed=43"],  # the noise floor: another random order and initialisation, nothing else
    "group_by_length": ["data.group_by_length=true"],
    "packing": ["data.packing=true"],
    "adamw_torch_fused": ["train.optim=adamw_torch_fused"],
    "loss_average=tokens": ["train.loss_average=tokens"],
    "max_grad_norm=1.0": ["train.max_grad_norm=1.0"],
}
AUTHORS = ["train.optim=adamw_torch", "train.max_grad_norm=0", "train.loss_average=batch",
           "data.group_by_length=false", "data.packing=false"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", default="/tmp/qilin-deviations")
    args = ap.parse_args()

    import shutil

    from qilin_lite.config import load_recipe
    from qilin_lite.demo.base import TinySpec, build_tiny_base, train_sentencepiece
    from qilin_lite.demo.data import CHOICES, QUESTIONS, DemoDataSpec, demo_texts, make_demo_data
    from qilin_lite.model import assemble_base
    from qilin_lite.train.stage import run_stage

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    n = 64 if args.quick else 480
    spec = DemoDataSpec(n_align=n, n_tune=n, n_heldout=max(16, n // 6), image_size=64, tasks=("presence", "modality"))
    paths = make_demo_data(work / "data", spec)
    questions = [(q, list(CHOICES[t])) for t in spec.tasks for q in QUESTIONS[t]]
    tiny = TinySpec(image_size=64, patch_size=16, pretrain_steps=30 if args.quick else 150)
    vision, llm = build_tiny_base(work / "tiny", demo_texts(spec), questions, tiny)
    # the LLM's tokenizer as LLaMA ships it (SentencePiece), so the authors' encoding runs
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (llm / f).unlink(missing_ok=True)
    from qilin_lite.families import TEMPLATES
    from qilin_lite.demo.base import chat_texts

    corpus = demo_texts(spec) + chat_texts({"questions": questions}, 500, 0) + [TEMPLATES["vicuna_v1"].system]
    tok = train_sentencepiece(corpus, llm, vocab_size=600)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(llm))
    lm.resize_token_embeddings(len(tok))
    lm.save_pretrained(llm)
    base = assemble_base(str(vision), str(llm), work / "base", dtype="float32")
    common = {"model.dtype": "float32", "model.attn": "sdpa", "train.bf16": False, "train.tf32": False,
              "train.gradient_checkpointing": False, "data.num_workers": 0,
              "data.image_folder": str(paths["images"]), "data.max_length": 256, "train.logging_steps": 1,
              "train.save_steps": 100000, "train.report_to": "none"}
    align = load_recipe(ROOT / "recipes/qilin-med-vl/align.yaml", ["train.deepspeed=none"], output_dir=str(work / "align"), **common, **{
        "model.base": str(base), "data.train": str(paths["align"]), "train.global_batch": 16,
        "train.per_device_batch": 16, "train.lr": 5e-3, "train.epochs": 1 if args.quick else 2})
    run_stage(align)
    rows = {}
    for name, extra in VARIANTS.items():
        t0 = time.time()
        r = load_recipe(ROOT / "recipes/qilin-med-vl/tune-full.yaml", AUTHORS + extra + ["train.deepspeed=none"],
                        output_dir=str(work / name),
                        **common, **{"model.from_run": str(work / "align"), "data.train": str(paths["tune"]),
                                     "data.eval": str(paths["heldout"]), "train.global_batch": 16,
                                     "train.per_device_batch": 8, "train.lr": 1e-3, "train.epochs": 2,
                                     "train.warmup_ratio": 0.03})
        run_stage(r)
        hist = json.loads((work / name / "log_history.json").read_text())
        losses = [h["loss"] for h in hist if "loss" in h]
        evals = [h["eval_loss"] for h in hist if "eval_loss" in h]
        rows[name] = {"losses": losses, "final_loss": losses[-1], "eval_loss": evals[-1], "seconds": time.time() - t0}
    ref = np.array(rows["authors"]["losses"])
    print(f"{'setting':22s} {'steps':>5s} {'|d loss| 1st q':>15s} {'|d loss| last q':>16s} {'final loss':>11s} "
          f"{'held-out loss':>14s}")
    for name, row in rows.items():
        cur = np.array(row["losses"])
        k = min(len(cur), len(ref))
        q = max(1, k // 4)
        d = np.abs(cur[:k] - ref[:k])
        row.update(first_quarter=float(d[:q].mean()), last_quarter=float(d[-q:].mean()), steps=len(cur))
        print(f"{name:22s} {len(cur):5d} {row['first_quarter']:15.4f} {row['last_quarter']:16.4f} "
              f"{row['final_loss']:11.4f} {row['eval_loss']:14.4f}")
    if not args.quick:
        from benchmarks.harness import RESULTS

        out = RESULTS / "deviations_vs_authors.json"
        out.write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in rows.items()},
                                  indent=1))


if __name__ == "__main__":
    main()
