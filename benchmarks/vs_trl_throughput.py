"""Training throughput and data wait: qilin-lite's `train_stage` against the stock trl path, same model and data.

In:  a Llava base directory, LLaVA records (harness/synth.py), a stage and the settings both sides share.
Out: per run, a `Probe` (harness/probe.py) with the wall time of the training loop, the time spent fetching batches,
     the samples seen and the real (non-padding) / all tokens of the batches the model actually received.

- ours:  `qilin_lite.train.stage.train_stage` with the shipped paper recipe (align.yaml / tune-full.yaml), CPU overrides.
         QilinTrainer is subclassed (passed as `trainer_cls`) to add the probe; dataset, collator, sampler and config are the real ones.
- stock: what a trl user writes: `SFTTrainer(model, SFTConfig(...), train_dataset=messages+images dataset,
         processing_class=LlavaProcessor)`, so trl's `DataCollatorForVisionLanguageModeling` tokenizes, expands
         `<image>` and processes images per batch, and the Trainer samples at random. Same model (loaded and frozen
         by the same `load_vlm` + `configure`), same chat template, batch, learning rate, schedule, optimizer,
         clipping and workers.

Timing: the loop runs from `on_train_begin` to the last `on_step_end` (setup before it and the final checkpoint
after it are not timed).
Data wait: time inside `Trainer.get_batch_samples`, which is where the loop blocks on the DataLoader iterator.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness.probe import PARTS, Probe, instrumented  # noqa: F401  (vs_trl.py reads PARTS here)


@dataclass
class Settings:
    """What both sides share (CPU-sized; the paper's other settings come from its recipes)."""

    batch: int
    num_workers: int = 4  # the shipped paper recipes' data.num_workers
    max_steps: int = -1  # -1: one full epoch over the records
    seed: int = 42
    # True: both sides sample length-grouped batches, the same ones (ours: `data.group_by_length: true`; stock: the
    # Trainer given a length-grouped sampler over precomputed lengths, as LLaMA-Factory's `group_by_length` run)
    grouped: bool = False


RECIPE = {"align": "qilin-med-vl/align.yaml", "tune": "qilin-med-vl/tune-full.yaml"}
MODE = {"align": "align", "tune": "full"}


def ours_recipe(stage: str, base: Path, data: dict, out: Path, s: Settings):
    from qilin_lite.config import REPO_RECIPES, load_recipe

    overrides = [
        "train.deepspeed=",  # one CPU process
        "model.dtype=float32", "model.attn=sdpa", "train.bf16=false", "train.tf32=false",
        "train.gradient_checkpointing=false",  # CPU: both sides skip it; it scales compute, not padding
        f"train.per_device_batch={s.batch}", f"train.global_batch={s.batch}",
        f"train.max_steps={s.max_steps}", "train.save_steps=1000000", "train.logging_steps=1", f"train.seed={s.seed}",
        f"data.num_workers={s.num_workers}", f"data.group_by_length={str(s.grouped).lower()}",
    ]
    return load_recipe(
        REPO_RECIPES / RECIPE[stage], overrides, output_dir=str(out),
        **{"model.base": str(base), "data.train": str(data[stage]), "data.image_folder": str(data["images"])},
    )


def run_ours(stage: str, base: Path, data: dict, out: Path, s: Settings) -> Probe:
    import qilin_lite.train.stage as train_mod
    from qilin_lite.train.trainer import QilinTrainer

    probe = Probe()
    train_mod.train_stage(ours_recipe(stage, base, data, out, s), trainer_cls=instrumented(QilinTrainer, probe))
    return probe


def stock_dataset(records_path: Path, image_folder: Path):
    """LLaVA JSON -> the `messages` + `images` dataset trl's docs show for vision SFT (images decoded on access)."""
    import datasets

    rows = json.loads(Path(records_path).read_text(encoding="utf-8"))
    messages, images = [], []
    role = {"human": "user", "gpt": "assistant"}
    for r in rows:
        # trl inserts the image before the first user text itself, so the "<image>" tag comes out of the text
        messages.append([
            {"role": role[t["from"]], "content": t["value"].replace("<image>\n", "").replace("<image>", "")}
            for t in r["conversations"]
        ])
        images.append([str(Path(image_folder) / r["image"])])
    ds = datasets.Dataset.from_dict({"messages": messages, "images": images})
    return ds.cast_column("images", datasets.List(datasets.Image()))


def run_stock(stage: str, base: Path, data: dict, out: Path, s: Settings, num_workers: int | None = None) -> Probe:
    from transformers import AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from qilin_lite.families import chat_template_jinja, get_template
    from qilin_lite.model import load_vlm
    from qilin_lite.train.stages import configure

    recipe = ours_recipe(stage, base, data, out, s)  # the shared settings, read from the same recipe
    tr = recipe.train
    model = load_vlm(str(base), dtype="float32", attn="sdpa")
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    model = configure(model, tr.mode)
    processor = AutoProcessor.from_pretrained(str(base))
    processor.chat_template = chat_template_jinja(get_template(recipe.template))  # same prompt text as ours
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=tr.per_device_batch,
        gradient_accumulation_steps=1,
        learning_rate=tr.lr,
        num_train_epochs=tr.epochs,
        max_steps=tr.max_steps,
        lr_scheduler_type=tr.scheduler,
        warmup_steps=tr.warmup_ratio,
        weight_decay=tr.weight_decay,
        optim=tr.optim,  # the recipe's (the authors' adamw_torch): SFTConfig's default is the fused AdamW
        max_grad_norm=tr.max_grad_norm,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=tr.logging_steps,
        save_steps=tr.save_steps,
        seed=tr.seed,
        report_to="none",
        dataloader_num_workers=recipe.data.num_workers if num_workers is None else num_workers,
        max_length=recipe.data.max_length,
        use_cpu=True,
    )
    probe = Probe()
    trainer_cls = SFTTrainer
    if s.grouped:
        trainer_cls = grouped_stock(SFTTrainer, sample_lengths(recipe, base, out), tr.seed)
    trainer = instrumented(trainer_cls, probe)(
        model=model, args=args, train_dataset=stock_dataset(data[stage], data["images"]), processing_class=processor,
    )
    trainer.train()
    return probe


def sample_lengths(recipe, base: Path, out: Path) -> list[int]:
    """Each record's token count, image tokens included: what a length-grouped stock run sorts by (LLaMA-Factory
    reads it from its tokenized dataset). Both sides encode the same tokens, so ours' precomputed lengths serve."""
    from transformers import AutoConfig

    from qilin_lite.model import load_tokenizer_and_processor
    from qilin_lite.train.data import build_dataset

    tok, image_processor = load_tokenizer_and_processor(str(base))
    Path(out).mkdir(parents=True, exist_ok=True)
    ds, _ = build_dataset(recipe, tok, image_processor, AutoConfig.from_pretrained(str(base)), Path(out))
    return [int(x) for x in ds.lengths]


def grouped_stock(trainer_cls, lengths: list[int], seed: int):
    """The stock trainer sampling length-grouped batches: the same sampler and seed as ours, so both sides train on
    the same batches and any difference is per-step cost."""
    from qilin_lite.train.sampler import EpochGroupedSampler

    class GroupedStock(trainer_cls):
        def _get_train_sampler(self, train_dataset=None):
            return EpochGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                       lengths, seed)

    return GroupedStock


def profile_ours(stage: str, base: Path, data: dict, out: Path, s: Settings, top: int = 15) -> str:
    """cProfile of one run of ours (main process): where the time goes, by own time per function."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    run_ours(stage, base, data, out, s)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def data_cost(stage: str, base: Path, data: dict, out: Path, s: Settings, n: int = 128, repeats: int = 3,
              top: int = 10) -> dict:
    """CPU milliseconds per sample of each side's data path alone (no model), as the DataLoader drives it:
    `dataset.__getitems__(batch indices)` then the collator, in this process; interleaved, median of `repeats`.
    Also a cProfile of ours' data path: where its time goes."""
    import cProfile
    import io
    import pstats
    import statistics

    from transformers import AutoConfig, AutoProcessor
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from qilin_lite.families import chat_template_jinja, get_template
    from qilin_lite.model import load_tokenizer_and_processor
    from qilin_lite.train.collator import Collator
    from qilin_lite.train.dataset import as_hf_dataset
    from qilin_lite.train.data import build_dataset

    recipe = ours_recipe(stage, base, data, out, s)
    Path(out).mkdir(parents=True, exist_ok=True)
    tok, image_processor = load_tokenizer_and_processor(str(base))
    ds, _ = build_dataset(recipe, tok, image_processor, AutoConfig.from_pretrained(str(base)), Path(out))
    ours_ds, ours_collate = as_hf_dataset(ds), Collator(tok.pad_token_id)
    processor = AutoProcessor.from_pretrained(str(base))
    processor.chat_template = chat_template_jinja(get_template(recipe.template))
    stock_ds = stock_dataset(data[stage], data["images"])
    stock_collate = DataCollatorForVisionLanguageModeling(processor=processor, max_length=recipe.data.max_length)
    n = min(n, len(ours_ds)) // s.batch * s.batch
    batches = [list(range(i, i + s.batch)) for i in range(0, n, s.batch)]

    def ours():
        for b in batches:
            ours_collate(ours_ds.__getitems__(b))

    def stock():
        for b in batches:
            stock_collate(stock_ds.__getitems__(b))

    ms = {"ours": [], "stock": []}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("stock", stock)):
            t = time.process_time()
            fn()
            ms[name].append(1000 * (time.process_time() - t) / n)
    prof = cProfile.Profile()
    prof.enable()
    ours()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return {
        "ours_ms_per_sample": statistics.median(ms["ours"]), "stock_ms_per_sample": statistics.median(ms["stock"]),
        "runs_ms": ms, "samples": n, "ours_profile": buf.getvalue(),
    }
