"""qilin-lite against LLaMA-Factory fine-tuning a Qwen2.5-VL at native resolution on mixed image sizes: samples per
second of the same full fine-tune of the same model on the same records, each tool from its own command line, rounds
interleaved, with each side's preprocessing time per record, peak memory and where its step spends its time.

In:  LLaMA-Factory 0.9.5 in its own environment (`--lf-python`; not a qilin-lite dependency), harness/qwen_vl_synth.py's
     Qwen2.5-VL (LLM 128 wide x 2 layers, Qwen's real 151,936-row vocabulary, a 2-block vision tower; min / max
     pixels 3,136 / 1,048,576 in its preprocessor_config.json) and 160 records, each with its own image of 64-1024 px
     a side (varied aspect: 4 to ~1,300 image tokens), ChiMed-VL-shaped question and answer lengths in Qwen tokens.
Out: per round and run the Trainer's `train_samples_per_second` and `train_loss` (both tools run transformers'
     Trainer: the same clock, setup excluded), the trainable parameter count each logs, the peak RSS of its process
     (`wait4`), preprocessing per record (each tool's own code on every record, timed outside training:
     LLaMA-Factory's dataset map, which tokenizes and counts image tokens before training, and qilin-lite's
     per-sample work, which it does in the loop: decode, tokenize, image processor; and in training, the step
     profile's data wait per record), the step profile (harness/probe_site/sitecustomize.py: the same code times both tools), medians and
     per-round ratios; JSON in `OUT/results.json` and benchmarks/results/vs_llamafactory_qwen_vl.json.

Same work on both sides: one model directory and its chat template / image processor; LLaMA-Factory's `qwen2_vl`
template and qilin-lite's `qwen2-vl` (the default system prompt, each reply, its <|im_end|> and the newline
supervised): the script checks, before any timing, that both tools give the same input ids and the same supervised
positions on the first records (LLaMA-Factory's own dataset preprocessing against qilin-lite's collator) and prints
the counts. LLaMA-Factory's `image_max_pixels` / `image_min_pixels` are set to the processor's bounds, so neither tool
resizes before the processor (every image lies within them) and both get the same image tokens. Full fine-tune (LLM +
merger, vision tower frozen; qilin-lite `tune --full` with the Qwen2.5-VL recipe, LLaMA-Factory `finetuning_type:
full`), batch 4, no accumulation, lr 2e-5 for every trained part, cosine with 3% warmup, no weight decay, fp32, sdpa,
fused AdamW, no clipping, no activation checkpointing (LLaMA-Factory's default is on:
`disable_gradient_checkpointing`), no data workers, cutoff 4096 positions (no record is cut), one epoch, seed 42, one
thread each. Orders: length-grouped on both (qilin-lite `data.group_by_length`, LLaMA-Factory
`train_sampling_strategy: group_by_length`: transformers' LengthGroupedSampler, the same batches) every round, and
each tool's default (random) order in the first `--random-rounds` rounds (a random-order LLaMA-Factory run takes ~10
minutes here).

LLaMA-Factory 0.9.5 here, outside the repository: `python3 -m venv V; V/bin/pip install torch==2.13.0; V/bin/pip
install --no-deps llamafactory==0.9.5`, then `V/bin/pip install transformers==5.6.0 trl==0.24.0 peft==0.18.1
accelerate==1.11.0 datasets==4.0.0 torchdata==0.11.0 "tyro<0.9" omegaconf fire einops sentencepiece tiktoken scipy
pandas matplotlib psutil`, and `V/bin/pip install --no-deps torchvision==0.28.0` (Qwen2_5_VLProcessor imports it). That
wheel's C ops do not load beside this torch, and its torchvision/_meta_registrations.py then fails at import on two
`@torch.library.register_fake("torchvision::nms")` / `("torchvision::qnms")` decorators; in the side environment
only, each becomes a no-op where the op is missing:

    sed -i 's/^@torch.library.register_fake("torchvision::\\(q\\?nms\\)")$/@(torch.library.register_fake("torchvision::\\1")
        if hasattr(torch.ops.torchvision, "\\1") else (lambda f: f))/' V/lib/python3.11/site-packages/torchvision/_meta_registrations.py

(one line; nms is never called). torchaudio, which LLaMA-Factory imports at module level, is a stub this script writes.

    python benchmarks/vs_llamafactory_qwen_vl.py --lf-python V/bin/python [--rounds 3] [--random-rounds 1]
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
sys.path.insert(0, str(ROOT))
from benchmarks.vs_llamafactory import trainer_metrics  # noqa: E402

MIN_PIXELS, MAX_PIXELS, CUTOFF, BATCH, LR = 56 * 56, 1024 * 1024, 4096, 4, 2.0e-5
SIDES = ("lf", "ours")


def prepare(out: Path, n: int) -> dict:
    """The base (cached), the records in both layouts, the torchaudio stub."""
    from benchmarks.harness.qwen_vl_synth import build_qwen_vl_base, write_native_records

    base = build_qwen_vl_base(Path.home() / ".cache" / "qilin-lite" / "bench-qwen-vl", min_pixels=MIN_PIXELS,
                              max_pixels=MAX_PIXELS)
    paths = write_native_records(out / "data", n)
    rows = json.loads(paths["tune"].read_text(encoding="utf-8"))
    lf_rows = [{"conversations": r["conversations"], "images": [str(paths["images"] / r["image"])]} for r in rows]
    (out / "data" / "lf_tune.json").write_text(json.dumps(lf_rows, ensure_ascii=False), encoding="utf-8")
    (out / "data" / "dataset_info.json").write_text(json.dumps({"tune": {
        "file_name": "lf_tune.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "images": "images"}}}), encoding="utf-8")
    stub = out / "stub" / "torchaudio"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text('"""stub: LLaMA-Factory imports torchaudio; no audio is used"""\n'
                                      '__version__ = "2.13.0"\n')
    return {"base": base, "data": out / "data", "tune": paths["tune"], "images": paths["images"], "stub": stub.parent}


def lf_config(p: dict, out: Path, grouped: bool) -> dict:
    return {
        "model_name_or_path": str(p["base"]), "stage": "sft", "do_train": True, "finetuning_type": "full",
        "freeze_vision_tower": True, "freeze_multi_modal_projector": False, "dataset": "tune",
        "dataset_dir": str(p["data"]), "template": "qwen2_vl", "cutoff_len": CUTOFF, "overwrite_cache": True,
        "image_max_pixels": MAX_PIXELS, "image_min_pixels": MIN_PIXELS,  # = the processor's: no resize before it
        "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "output_dir": str(out), "logging_steps": 10,
        "save_strategy": "no", "overwrite_output_dir": True, "report_to": "none",
        "per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1, "learning_rate": LR,
        "num_train_epochs": 1.0, "max_grad_norm": 0.0, "lr_scheduler_type": "cosine", "warmup_ratio": 0.03,
        "weight_decay": 0.0, "optim": "adamw_torch_fused", "bf16": False, "fp16": False, "use_cpu": True, "seed": 42,
        "flash_attn": "sdpa", "disable_gradient_checkpointing": True,  # LLaMA-Factory checkpoints by default
        **({"train_sampling_strategy": "group_by_length"} if grouped else {}),
    }


def ours_args(p: dict, out: Path, grouped: bool) -> list[str]:
    sets = {"data.template": "qwen2-vl", "data.min_pixels": MIN_PIXELS, "data.max_pixels": MAX_PIXELS,
            "data.max_length": CUTOFF, "data.length_mode": "total", "data.num_workers": 0,
            "data.group_by_length": str(grouped).lower(), "train.per_device_batch": BATCH,
            "train.global_batch": BATCH, "train.lr": LR, "train.projector_lr": LR, "train.weight_decay": 0.0,
            "model.dtype": "float32", "model.attn": "sdpa", "train.bf16": "false", "train.tf32": "false",
            "train.gradient_checkpointing": "false", "train.optim": "adamw_torch_fused", "train.max_grad_norm": 0,
            "train.save_steps": 100000, "train.logging_steps": 10, "train.seed": 42}
    args = ["tune", str(ROOT / "recipes" / "lingshu-7b" / "tune-lora.yaml"), "--full", "--model", str(p["base"]),
            "--data", str(p["tune"]), "--image-folder", str(p["images"]), "--out", str(out), "--overwrite"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def env_for(side: str, p: dict, probe: Path | None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", **({"QL_PROBE": str(probe)} if probe else {}),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks" / "harness" / "probe_site"),
                                           *([str(p["stub"])] if side == "lf" else [])])}


def run(name: str, p: dict, out: Path, lf_python: str) -> dict:
    side, order = name.split("-")
    target = out / name
    probe = out / f"{name}.probe.json"
    out.mkdir(parents=True, exist_ok=True)
    if side == "lf":
        cfg = out / f"{name}.yaml"  # YAML holds JSON
        cfg.write_text(json.dumps(lf_config(p, target, order == "grouped")), encoding="utf-8")
        cmd = [str(Path(lf_python).with_name("llamafactory-cli")), "train", str(cfg)]
    else:
        cmd = [str(Path(sys.executable).with_name("qilin-lite")), *ours_args(p, target, order == "grouped")]
    log_path = out / f"{name}.log"
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env_for(side, p, probe))
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not the cumulative maximum
    wall = time.time() - t0
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{name} failed:\n{text[-3000:]}")
    m = trainer_metrics(text)
    prof = json.loads(probe.read_text(encoding="utf-8")) if probe.exists() else None
    return {**m, "wall_s": round(wall, 1), "setup_s": round(wall - m["runtime_s"], 1),
            "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2), "profile": prof,
            "data_wait_ms_per_record": round(1000 * prof["median_s"]["data"] / BATCH, 2) if prof else None}


def same_work(p: dict, out: Path, lf_python: str, k: int = 4) -> dict:
    """Both tools' input ids and labels on the first `k` records (they must be equal), and each tool's preprocessing
    time per record over all records, in its own code."""
    from PIL import Image
    from transformers import AutoConfig

    from qilin_lite.data.records import messages_from_llava
    from qilin_lite.encoding import encode
    from qilin_lite.families import IGNORE, get_template
    from qilin_lite.images.pixel_values import NativeImageLoader
    from qilin_lite.model import load_tokenizer_and_processor, token_layout

    cfg = out / "check.yaml"
    cfg.write_text(json.dumps(lf_config(p, out / "check", True)), encoding="utf-8")
    done = subprocess.run([lf_python, str(ROOT / "benchmarks" / "harness" / "lf_encode.py"), str(cfg), str(k),
                           str(out / "check.json")], capture_output=True, text=True, env=env_for("lf", p, None))
    if done.returncode != 0:
        raise RuntimeError("LLaMA-Factory's preprocessing failed:\n" + done.stderr[-3000:])
    lf = json.loads((out / "check.json").read_text(encoding="utf-8"))
    tok, ip = load_tokenizer_and_processor(str(p["base"]))
    loader = NativeImageLoader(ip)
    layout = token_layout(AutoConfig.from_pretrained(str(p["base"])), CUTOFF, "total")
    template = get_template("qwen2-vl")
    rows = json.loads(p["tune"].read_text(encoding="utf-8"))
    ours, tokens = [], []
    t0 = time.perf_counter()
    for r in rows:  # what qilin-lite's dataset does per sample: open the image, tokenize, process the pixels
        img = [Image.open(p["images"] / r["image"]).convert("RGB")]
        ids, labels = encode(messages_from_llava(r["conversations"]), template, tok, layout, loader.counts(img))
        loader.inputs(img)
        ours.append((ids.tolist(), labels.tolist()))
        tokens.append(loader.counts(img)[0])
    ours_s = time.perf_counter() - t0
    first = []
    for i in range(k):
        a, b = lf["first"][i], ours[i]
        sup = (sum(x != IGNORE for x in a["labels"]), sum(x != IGNORE for x in b[1]))
        first.append({"record": i, "positions": [len(a["input_ids"]), len(b[0])], "supervised": list(sup),
                      "same_ids": a["input_ids"] == b[0], "same_labels": a["labels"] == b[1]})
        print(f"record {i}: positions LF {len(a['input_ids'])} / ours {len(b[0])}, supervised LF {sup[0]} / ours "
              f"{sup[1]}, same ids {first[-1]['same_ids']}, same labels {first[-1]['same_labels']}", flush=True)
    if not all(f["same_ids"] and f["same_labels"] for f in first):
        raise SystemExit("the two tools do not train on the same tokens: see the records above")
    n = len(rows)
    return {"first_records": first, "image_tokens": {"min": min(tokens), "median": statistics.median(tokens),
                                                    "max": max(tokens)},
            "positions": {"min": min(len(x[0]) for x in ours), "median": statistics.median(len(x[0]) for x in ours),
                          "max": max(len(x[0]) for x in ours)},
            "supervised_total": sum(sum(y != IGNORE for y in x[1]) for x in ours),
            "prep_ms_per_record": {"lf": round(1000 * lf["seconds"] / lf["records"], 2),
                                   "ours": round(1000 * ours_s / n, 2)}}


def table(rounds: list[dict], names: list[str], check: dict) -> tuple[dict, list[str]]:
    def med(k, key):
        v = [x[k][key] for x in rounds if k in x and x[k].get(key) is not None]
        return statistics.median(v) if v else None

    def fmt(v: list[float]) -> str:
        return f"**{statistics.median(v):.2f}x** ({', '.join(f'{x:.2f}' for x in v)})" if v else "-"

    lines = ["| run | rounds | samples/s (median) | train loss (round 1) | trainable parameters | peak RSS GB | "
             "setup s | data wait ms/record |", "|---|---|---|---|---|---|---|---|"]
    for k in names:
        r = next(x[k] for x in rounds if k in x)
        wait = med(k, "data_wait_ms_per_record")  # None: too few steps to profile
        lines.append(f"| {k} | {sum(k in x for x in rounds)} | {med(k, 'samples_per_s'):.3f} | {r['loss']:.4f} | "
                     f"{r['trainable'] or 0:,} | {med(k, 'peak_rss_gb'):.2f} | {med(k, 'setup_s'):.1f} | "
                     f"{'-' if wait is None else f'{wait:.1f}'} |")
    pairs = [("ours-grouped", "lf-grouped"), ("ours-random", "lf-random"), ("ours-grouped", "lf-random")]
    ratios, step_ratios = {}, {}
    for a, b in pairs:
        both = [x for x in rounds if a in x and b in x]
        ratios[f"{a} / {b}"] = [round(x[a]["samples_per_s"] / x[b]["samples_per_s"], 3) for x in both]
        step_ratios[f"{a} / {b}"] = [round(x[b]["profile"]["median_s"]["step"] / x[a]["profile"]["median_s"]["step"],
                                           3) for x in both if x[a]["profile"] and x[b]["profile"]]
    lines += ["", "| speed ratio | samples/s (rounds) | by median step time (rounds) |", "|---|---|---|"]
    lines += [f"| {k} | {fmt(v)} | {fmt(step_ratios[k])} |" for k, v in ratios.items() if v]
    pre = check["prep_ms_per_record"]
    lines += ["", f"Preprocessing per record, each tool's own code on all records: LLaMA-Factory {pre['lf']:.1f} ms "
              f"(its dataset map, before training), qilin-lite {pre['ours']:.1f} ms (its per-sample work, done in "
              "the loop).", "", "Step profile, median seconds per optimizer step (median over rounds):", "",
              "| run | data wait | forward + loss | backward | optimizer | other | step |", "|---|---|---|---|---|---|---|"]
    for k in names:
        profs = [x[k]["profile"]["median_s"] for x in rounds if k in x and x[k].get("profile")]
        if profs:
            m = {q: statistics.median(pr[q] for pr in profs) for q in profs[0]}
            lines.append(f"| {k} | " + " | ".join(f"{m[q]:.4f}" for q in
                                                   ("data", "forward_loss", "backward", "optimizer", "other", "step"))
                         + " |")
    return {"median_samples_per_s": {k: med(k, "samples_per_s") for k in names}, "ratios": ratios,
            "step_ratios": step_ratios}, lines


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lf-python", help="python of an environment with llamafactory 0.9.5 (required to run)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the length-grouped pair")
    ap.add_argument("--random-rounds", type=int, default=1, help="of them, how many also run the default order")
    ap.add_argument("--records", type=int, default=160)
    ap.add_argument("--out", type=Path, default=Path("/tmp/vs-llamafactory-qwen-vl"))
    ap.add_argument("--table", type=Path, help="only print the tables of a results.json this script wrote")
    ap.add_argument("--no-write", action="store_true", help="keep the JSON in OUT only")
    args = ap.parse_args(argv)
    if args.table:
        saved = json.loads(args.table.read_text(encoding="utf-8"))
        print("\n".join(table(saved["rounds"], saved["names"], saved["check"])[1]))
        return saved
    if not args.lf_python:
        ap.error("--lf-python is required (an environment with llamafactory 0.9.5; see the docstring)")
    args.out.mkdir(parents=True, exist_ok=True)
    p = prepare(args.out, args.records)
    check = same_work(p, args.out, args.lf_python)
    print(f"image tokens {check['image_tokens']}, positions {check['positions']}, supervised in all "
          f"{check['supervised_total']}; preprocessing ms/record {check['prep_ms_per_record']}", flush=True)
    names = ["lf-grouped", "ours-grouped", "lf-random", "ours-random"]
    rounds = []
    for r in range(args.rounds):
        todo = names if r < args.random_rounds else names[:2]
        rounds.append({})
        for name in todo:
            rounds[-1][name] = run(name, p, args.out / f"r{r}", args.lf_python)
            x = rounds[-1][name]
            print(f"round {r + 1} {name}: {x['samples_per_s']:.3f}/s, loss {x['loss']:.4f}, peak RSS "
                  f"{x['peak_rss_gb']} GB, wall {x['wall_s']} s", flush=True)
    names = [k for k in names if any(k in x for x in rounds)]
    summary, lines = table(rounds, names, check)
    print("\n".join(lines))
    result = {"names": names, "check": check, "rounds": rounds, **summary, "table": lines}
    (args.out / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    if not args.no_write:
        from benchmarks.harness import RESULTS

        (RESULTS / "vs_llamafactory_qwen_vl.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(f"wrote {RESULTS / 'vs_llamafactory_qwen_vl.json'}")
    return result


if __name__ == "__main__":
    main()
