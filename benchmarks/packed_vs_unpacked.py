"""`--packing` against unpacked batches, per attention implementation: is the automatic choice ever slower?

    python benchmarks/packed_vs_unpacked.py [--records 480] [--rounds 3] [--attn sdpa eager] [--quick]

One tiny Llava (LLM 256 x 2 layers, 64 image tokens), ChiMed-VL-shaped tune records (harness/synth.py), full fine-tune,
fp32, 1 thread, no workers, batch 8, one epoch; for each attention implementation the CPU has (sdpa, eager) and each
order (length-grouped, the default; random): unpacked, packed as the automatic choice decides (`data.packing: true`),
packed into rows of max_length whatever the estimate (`data.packing_row_length`), and the same rows with the batch
counted in tokens (`packed-max-tokens`: as many rows per step as hold about the unpacked batch's real tokens, so a
step's tensors are as large as unpacked ones; on the CPU a batch of 8 x 2048 tokens falls out of the caches).
`--attn sdpa` runs one attention implementation. Interleaved rounds; the median
of the per-round ratios to the same round's unpacked run, each round's ratio, the attention the language model
trained with (packed rows train with segments.py's per-sample attention), the estimate's own work ratio (so a wrong
estimate shows), and the epoch's training loss beside the unpacked run's (packing changes which samples share a
step, so this agrees only approximately; per-sample equality is tested in tests/test_packing.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_one(base: Path, data: dict, out: Path, *, attn: str, grouped: bool, layout: str, max_length: int,
            batch: int, token_batch: int = 1, dtype: str = "float32") -> dict:
    import qilin_lite.train.stage as train_mod
    from benchmarks.harness.probe import Probe, instrumented
    from qilin_lite.config import REPO_RECIPES, load_recipe

    sets = ["train.deepspeed=", f"model.dtype={dtype}", f"model.attn={attn}",
            f"train.bf16={str(dtype == 'bfloat16').lower()}", "train.tf32=false",
            "train.gradient_checkpointing=false", f"train.per_device_batch={batch}", f"train.global_batch={batch}",
            "train.save_steps=1000000", "train.logging_steps=10", "data.num_workers=0",
            f"data.max_length={max_length}", f"data.group_by_length={str(grouped).lower()}"]
    if layout != "unpacked":
        sets.append("data.packing=true")
    if layout.startswith("packed-max"):
        sets.append(f"data.packing_row_length={max_length}")
    if layout == "packed-max-tokens":  # rows per batch holding about the unpacked batch's tokens
        sets += [f"train.per_device_batch={token_batch}", f"train.global_batch={token_batch}"]
    recipe = load_recipe(REPO_RECIPES / "qilin-med-vl/tune-full.yaml", sets, output_dir=str(out),
                         **{"model.base": str(base), "data.train": str(data["tune"]),
                            "data.image_folder": str(data["images"])})
    from qilin_lite.train.trainer import QilinTrainer

    probe = Probe()
    done, _ = train_mod.train_stage(recipe, trainer_cls=instrumented(QilinTrainer, probe))
    summary = json.loads((Path(done) / "train_summary.json").read_text(encoding="utf-8"))
    return {"samples_per_s": summary["samples"] / probe.loop_s, "rows": summary["rows"],
            "samples": summary["samples"], "packing": summary.get("packing"), "attention": summary.get("attention"),
            "final_loss": summary["final_loss"], "epoch_loss": _last_logged(Path(done), "train_loss"),
            "tokens": _last_logged(Path(done), "num_tokens"), "batch": batch if layout != "packed-max-tokens" else token_batch}


def _last_logged(run: Path, key: str) -> float:
    """The last value of `key` the Trainer logged (log_history.json): `num_tokens`, the real (non-padding) tokens
    the epoch trained on as trl counts them; `train_loss`, the epoch's mean training loss."""
    history = json.loads((run / "log_history.json").read_text(encoding="utf-8"))
    return next(h[key] for h in reversed(history) if key in h)


def main(argv=None) -> dict:
    from benchmarks.harness.synth import ModelSize, build_base, write_records
    from qilin_lite.model import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=480)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--attn", nargs="+", default=["sdpa", "eager"], choices=["sdpa", "eager", "flash_attention_2"])
    ap.add_argument("--orders", nargs="+", default=["grouped", "random"], choices=["grouped", "random"])
    ap.add_argument("--hidden", type=int, default=256, help="LLM width (the GPU check uses a wider one)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quick", action="store_true", help="32 records, 1 round, sdpa only: the code path only")
    args = ap.parse_args(argv)
    attns = tuple(args.attn)
    if args.quick:
        args.records, args.rounds, attns = 32, 1, ("sdpa",)
    torch.set_num_threads(1)
    layouts = ("unpacked", "packed-auto", "packed-max", "packed-max-tokens")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = build_base(work / "model", ModelSize(hidden=args.hidden, layers=args.layers,
                                                    heads=max(4, args.hidden // 128)))
        data = write_records(work / "data", load_tokenizer(str(base)), n=args.records, image_size=64)
        for r in range(args.rounds):
            for attn in attns:
                for grouped in [o == "grouped" for o in args.orders]:
                    for layout in layouts:
                        key = f"{attn}/{'grouped' if grouped else 'random'}/{layout}"
                        # the unpacked run's real tokens per sample (it runs first) size the batch in tokens
                        if layout == "packed-max-tokens":
                            u = results[key.rsplit("/", 1)[0] + "/unpacked"][0]
                            token_batch = max(1, round(8 * u["tokens"] / u["samples"] / args.max_length))
                        res = run_one(base, data, work / f"{key.replace('/', '-')}-{r}", attn=attn, grouped=grouped,
                                      layout=layout, max_length=args.max_length, batch=8,
                                      token_batch=token_batch if layout == "packed-max-tokens" else 1,
                                      dtype=args.dtype)
                        results.setdefault(key, []).append(res)
    rows = {}
    for key, runs in results.items():
        p = runs[0]["packing"]
        unpacked = results[key.rsplit("/", 1)[0] + "/unpacked"]
        per_round = [x["samples_per_s"] / u["samples_per_s"] for x, u in zip(runs, unpacked)]
        rows[key] = {"samples_per_s": statistics.median(x["samples_per_s"] for x in runs), "rows": runs[0]["rows"],
                     "samples": runs[0]["samples"], "attention": runs[0]["attention"],
                     "estimate_vs_unpacked": (p["rows_of_max_length_vs_unpacked"] if p["row_length"] is None
                                              else p["work_vs_unpacked"]) if p else None,
                     "batch": runs[0]["batch"],
                     "row_length": p["row_length"] if p else (args.max_length if "packed-max" in key else None),
                     "vs_unpacked": statistics.median(per_round), "per_round": per_round,
                     "epoch_loss": runs[0]["epoch_loss"], "loss_vs_unpacked": runs[0]["epoch_loss"] -
                     unpacked[0]["epoch_loss"]}
    print(table(rows))
    return rows


def table(rows: dict) -> str:
    lines = ["| attention / order / layout | trained with | batch | samples/s | vs unpacked (per round) | rows (samples) | "
             "row length | estimate | epoch loss (vs unpacked) |", "|---|---|---|---|---|---|---|---|---|"]
    for key, x in rows.items():
        est = "" if x["estimate_vs_unpacked"] is None else f"{x['estimate_vs_unpacked']:.2f}x"
        rl = "" if x["row_length"] is None else str(x["row_length"])
        rounds = ", ".join(f"{r:.2f}" for r in x["per_round"])
        lines.append(f"| {key} | {x['attention']} | {x['batch']} | {x['samples_per_s']:.1f} | {x['vs_unpacked']:.2f}x ({rounds}) | "
                     f"{x['rows']} ({x['samples']}) | {rl} | {est} | {x['epoch_loss']:.4f} "
                     f"({x['loss_vs_unpacked']:+.4f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
