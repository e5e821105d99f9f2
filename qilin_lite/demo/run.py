"""`qilin-lite demo`: synthetic data -> tiny base -> align -> tune --qlora -> held-out accuracy before and after.

Every step is the code a real run uses (recipes, assemble_base, run_stage, the generator, the scorer); only the
data and the model size are scaled down so it finishes in minutes on two CPU cores.
Out: `OUT/data`, `OUT/tiny`, `OUT/align`, `OUT/tune`, `OUT/metrics.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from ..config import REPO_RECIPES, load_recipe
from ..errors import UserError
from .base import TinySpec, build_tiny_base
from .data import CHOICES, QUESTIONS, DemoDataSpec, chance_level, demo_texts, make_demo_data


STAGES = ("sft", "reinforce", "prefer")
WEAK_TUNE_STEPS = 60  # --stage reinforce starts from tune stopped here: it answers in the right words, often wrongly


def run_demo(out: Path, *, data_spec: DemoDataSpec | None = None, tiny: TinySpec | None = None,
             overrides: list[str] | None = None, echo=print, family: str = "llava", stage: str = "sft") -> dict:
    """`family`: llava (the paper's CLIP + LLaMA, joined by align) or a family in its own class (demo/native.py:
    qwen2.5-vl), whose tiny release stand-in align takes as `--model`. `stage`: sft (align -> tune), reinforce
    (align -> tune stopped early -> GRPO) or prefer (align -> tune -> DPO); the table compares the last stage with
    the model it started from."""
    from ..train.stage import run_stage
    from .native import DEMO_FAMILIES, NATIVE_DEMOS

    if family not in DEMO_FAMILIES:
        raise UserError(f"demo --family {family}: choose one of {', '.join(DEMO_FAMILIES)}")
    if stage not in STAGES:
        raise UserError(f"demo --stage {stage}: choose one of {', '.join(STAGES)}")
    if stage != "sft" and family != "llava":
        raise UserError(f"demo --stage {stage} runs on the llava family; drop --family or --stage")
    t0 = time.time()
    out = Path(out)
    # "is there a lesion" and "which modality" are decided by what the patches show, which a tiny random frozen
    # ViT passes on; "which side" also needs positions read from it and stayed near chance in our CPU budget.
    data_spec = data_spec or DemoDataSpec(n_align=1000, n_tune=1000, n_heldout=120, tasks=("presence", "modality"),
                                          n_questions=256 if stage == "reinforce" else 0)
    # 16 px patches: 16 image tokens per 64 px image, each large enough that a lesion changes it strongly.
    # LLaMA's kind of tokenizer (SentencePiece, byte fallback): the authors' encoding path, and llama.cpp reads it.
    tiny = tiny or TinySpec(image_size=data_spec.image_size, patch_size=16, tokenizer="sentencepiece")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: not empty; choose a new --out directory (the demo never overwrites a run)")
    recipes = REPO_RECIPES / "demo"
    if not recipes.is_dir():
        raise UserError(f"{recipes}: demo recipes not found; run the demo from a clone of the repository")

    n = 5 if stage == "sft" else 6
    echo(f"1/{n} synthetic data ...")
    paths = make_demo_data(out / "data", data_spec)
    echo(f"2/{n} tiny base model (tokenizer, LLM pre-training, vision encoder) ...")
    questions = [(q, list(CHOICES[t])) for t in data_spec.tasks for q in QUESTIONS[t]]
    common = {"data.image_folder": str(paths["images"])}
    tune_overrides = overrides
    if family not in NATIVE_DEMOS:  # the paper's: CLIP + LLaMA, joined by align
        vision, llm = build_tiny_base(out / "tiny", demo_texts(data_spec), questions, tiny)
        base = {"model.vision": str(vision), "model.llm": str(llm)}
        from ..families import guess_template

        dialog = guess_template(str(llm))  # the LLM's own dialog format, which tuning trains in
    else:
        from .native import DEMO_PIXELS, TUNE_OVERRIDES, build_tiny_native

        model_dir, dialog = build_tiny_native(out / "tiny", demo_texts(data_spec), questions, family,
                                              steps=tiny.pretrain_steps, seed=tiny.seed)
        base = {"model.base": str(model_dir)}
        common.update({"data.min_pixels": DEMO_PIXELS, "data.max_pixels": DEMO_PIXELS})
        tune_overrides = TUNE_OVERRIDES + list(overrides or [])  # applied in order: the user's come last and win

    echo(f"3/{n} align: projector only ...")
    align = load_recipe(recipes / "align.yaml", overrides, **common, output_dir=str(out / "align"),
                        **{"data.train": str(paths["align"]), **base})
    run_stage(align)
    heldout = json.loads(Path(paths["heldout"]).read_text(encoding="utf-8"))
    echo("   scoring held-out questions before tuning ...")
    # before tuning = the model tuning starts from, asked in the tuning template
    before = score(out / "align", paths, template=dialog)

    if stage == "reinforce":
        tune_overrides = [f"train.max_steps={WEAK_TUNE_STEPS}"] + list(tune_overrides or [])
    echo(f"4/{n} tune --qlora: 4-bit LLM + LoRA + projector" + (f", stopped after {WEAK_TUNE_STEPS} steps ..."
                                                               if stage == "reinforce" else " ..."))
    tune = load_recipe(recipes / "tune-qlora.yaml", tune_overrides, **common, output_dir=str(out / "tune"),
                       **{"data.train": str(paths["tune"]), "model.from_run": str(out / "align")})
    run_stage(tune)
    echo(f"5/{n} scoring held-out questions after tuning ...")
    after = score(out / "tune", paths)
    extra = {}
    if stage != "sft":
        before, (after, extra) = after, after_sft(stage, out, paths, recipes, common, overrides, echo)

    metrics = {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "chance": chance_level(heldout),
        "heldout": len(heldout),
        "per_task_before": before["per_task"],
        "per_task_after": after["per_task"],
        "seconds": round(time.time() - t0, 1),
        "family": family,
        "stage": stage,
        **extra,
        "data": asdict(data_spec),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    echo(table(metrics))
    return metrics


def after_sft(stage: str, out: Path, paths: dict, recipes: Path, common: dict, overrides, echo) -> tuple[dict, dict]:
    """The stage after tune: GRPO on the questions split, or DPO on pairs from the tune split; (its held-out score,
    what it logged)."""
    if stage == "reinforce":
        from ..reinforce.run import run_reinforce

        echo("6/6 reinforce (GRPO): 8 sampled answers a question, rewarded by eval's scoring ...")
        r = load_recipe(recipes / "reinforce.yaml", overrides, **common, output_dir=str(out / "reinforce"),
                        **{"data.train": str(paths["questions"]), "model.from_run": str(out / "tune")})
        done = run_reinforce(r)
        rows = [h for h in json.loads((done / "log_history.json").read_text()) if "reward" in h]
        extra = {"reward_first": rows[0]["reward"], "reward_last": rows[-1]["reward"]}
    else:
        from ..prefer.run import run_prefer
        from .data import make_demo_pairs

        echo("6/6 prefer (DPO): the tune split's answers chosen over another option ...")
        pairs = make_demo_pairs(paths["tune"], out / "pairs.jsonl")
        r = load_recipe(recipes / "prefer.yaml", overrides, **common, output_dir=str(out / "prefer"),
                        **{"data.train": str(pairs), "model.from_run": str(out / "tune")})
        done = run_prefer(r)
        rows = [h for h in json.loads((done / "log_history.json").read_text()) if "rewards/margins" in h]
        extra = {"margin_first": rows[0]["rewards/margins"], "margin_last": rows[-1]["rewards/margins"]}
    echo(f"   scoring held-out questions after {stage} ...")
    return score(done, paths), extra


def score(model_dir: Path, paths: dict, template: str | None = None) -> dict:
    """Greedy answers to the held-out questions, scored by `qilin-lite eval`'s own code."""
    from ..eval import score_demo_heldout

    return score_demo_heldout(model_dir, paths["heldout"], paths["images"], template=template)


def table(m: dict) -> str:
    stage = m.get("stage", "sft")
    names = {"sft": ("before tuning", "after tuning"), "reinforce": ("after early-stopped tune", "after GRPO"),
             "prefer": ("after tune", "after DPO")}[stage]
    rows = [("held-out accuracy", *names, "chance")]
    rows.append(("all", f"{m['accuracy_before']:.3f}", f"{m['accuracy_after']:.3f}", f"{m['chance']:.3f}"))
    for task in m["per_task_after"]:
        rows.append((task, f"{m['per_task_before'].get(task, 0):.3f}", f"{m['per_task_after'][task]:.3f}",
                     f"{1 / len(CHOICES[task]):.3f}"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    tail = ""
    if stage == "reinforce":
        tail = f"; mean reward {m['reward_first']:.2f} at step 1 -> {m['reward_last']:.2f} at the last"
    elif stage == "prefer":
        tail = f"; chosen-over-rejected margin {m['margin_first']:.3f} -> {m['margin_last']:.3f}"
    return "\n".join(lines) + f"\n({m['heldout']} held-out questions, {m['seconds']:.0f} s{tail})"

