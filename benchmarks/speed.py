"""Training throughput and data wait: qilin-lite's `train_stage` against the stock trl path, same model and data.

In:  a Llava base directory, LLaVA records (synth.py), a stage and the settings both sides share.
Out: per run, a `Probe` with the wall time of the training loop, the time spent fetching batches, the samples seen
     and the real (non-padding) / all tokens of the batches the model actually received.

- ours:  `qilin_lite.train.stage.train_stage` with the shipped paper recipe (align.yaml / tune-full.yaml), CPU overrides.
         QilinTrainer is subclassed (passed as `trainer_cls`) to add the probe; dataset, collator, sampler and config are the real ones.
- stock: what a trl user writes: `SFTTrainer(model, SFTConfig(...), train_dataset=messages+images dataset,
         processing_class=LlavaProcessor)`, so trl's `DataCollatorForVisionLanguageModeling` tokenizes, expands
         `<image>` and processes images per batch, and the Trainer samples at random. Same model (loaded and frozen
         by the same `load_llava` + `configure`), same chat template, batch, learning rate, schedule, optimizer,
         clipping and workers.

Timing: the loop runs from `on_train_begin` to the last `on_step_end` (setup before it and the final checkpoint
after it are not timed).
Data wait: time inside `Trainer.get_batch_samples`, which is where the loop blocks on the DataLoader iterator.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback


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


PARTS = ("data_wait", "forward_loss", "backward", "optimizer", "other")


@dataclass
class Probe(TrainerCallback):
    """Loop time, samples and tokens of one run, and each optimizer step split into PARTS: data wait (inside
    `get_batch_samples`), forward + loss (`compute_loss`), backward (the rest of `training_step`), optimizer
    (`on_pre_optimizer_step` -> `on_optimizer_step`) and other (the rest: clipping, callbacks, logging, scheduler)."""

    keep_batches: bool = False  # keep each step's micro-batches (overhead.py replays them in a bare loop)
    loop_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of this process over the same span: less sensitive to other users of the CPU
    fetch_s: list = field(default_factory=list)
    step_s: list = field(default_factory=list)
    parts: list = field(default_factory=list)  # per optimizer step: {part: seconds, "total": seconds}
    batches: list = field(default_factory=list)
    samples: int = 0
    real_tokens: int = 0
    all_tokens: int = 0
    shapes: list = field(default_factory=list)
    _t0: float = 0.0
    _c0: float = 0.0
    _ts: float = 0.0
    _opt: float = 0.0
    _pending_wait: float = 0.0
    _cur: dict = field(default_factory=dict)

    def on_train_begin(self, args, state, control, **kw):
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_step_begin(self, args, state, control, **kw):
        self._ts = time.perf_counter()
        self._cur = {p: 0.0 for p in PARTS}
        self._cur["data_wait"], self._pending_wait = self._pending_wait, 0.0  # fetched just before this step began

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self._opt = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kw):
        self._cur["optimizer"] += time.perf_counter() - self._opt

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        self.step_s.append(now - self._ts)
        total = now - self._ts + self._cur["data_wait"]
        self._cur["other"] = total - sum(self._cur[p] for p in PARTS if p != "other")
        self.parts.append({**self._cur, "total": total})
        # the loop ends at the last step: the checkpoint the Trainer writes after it is not training throughput
        self.loop_s = now - self._t0
        self.cpu_s = time.process_time() - self._c0

    def count(self, batch: dict) -> None:
        ids = batch["input_ids"]
        self.samples += int(ids.shape[0])
        mask = batch.get("attention_mask")
        self.real_tokens += int(mask.sum()) if mask is not None else int(ids.numel())
        self.all_tokens += int(ids.numel())
        self.shapes.append(tuple(ids.shape))

    def breakdown(self, skip: int = 0) -> dict:
        """Median seconds per optimizer step of each part and of the whole, leaving out `skip` warm-up steps."""
        import statistics

        steps = self.parts[skip:] or self.parts
        return {k: statistics.median(s[k] for s in steps) if steps else 0.0 for k in (*PARTS, "total")}

    def summary(self) -> dict:
        return {
            "loop_s": round(self.loop_s, 3),
            "samples": self.samples,
            "samples_per_s": self.samples / self.loop_s if self.loop_s else 0.0,
            "samples_per_cpu_s": self.samples / self.cpu_s if self.cpu_s else 0.0,
            "data_wait_fraction": sum(self.fetch_s) / self.loop_s if self.loop_s else 0.0,
            "real_token_fraction": self.real_tokens / max(self.all_tokens, 1),
            "tokens_per_step": self.all_tokens / max(len(self.step_s), 1),
            "steps": len(self.step_s),
            "step_s": [round(x, 3) for x in self.step_s],
            "breakdown_s": self.breakdown(skip=1 if len(self.parts) > 2 else 0),
        }


def instrumented(trainer_cls, probe: Probe):
    """`trainer_cls` with the probe attached, the batch fetch, the loss and the training step timed."""
    import torch

    class Timed(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(probe)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            t = time.perf_counter()
            batches, n_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            waited = time.perf_counter() - t
            probe.fetch_s.append(waited)
            probe._pending_wait += waited
            for b in batches:
                probe.count(b)
            if probe.keep_batches:
                probe.batches.append([{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()}
                                      for b in batches])
            return batches, n_items

        def training_step(self, model, inputs, num_items_in_batch=None):
            t = time.perf_counter()
            self._in_loss = 0.0
            out = super().training_step(model, inputs, num_items_in_batch)
            whole = time.perf_counter() - t
            probe._cur["forward_loss"] += self._in_loss
            probe._cur["backward"] += whole - self._in_loss
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            t = time.perf_counter()
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self._in_loss = getattr(self, "_in_loss", 0.0) + time.perf_counter() - t
            return out

    Timed.__name__ = f"Timed{trainer_cls.__name__}"
    return Timed


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

    from qilin_lite.conversation import chat_template_jinja, get_template
    from qilin_lite.model import load_llava
    from qilin_lite.train.stages import configure

    recipe = ours_recipe(stage, base, data, out, s)  # the shared settings, read from the same recipe
    tr = recipe.train
    model = load_llava(str(base), dtype="float32", attn="sdpa")
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

    from qilin_lite.conversation import chat_template_jinja, get_template
    from qilin_lite.model import load_tokenizer_and_processor
    from qilin_lite.processing import Collator, as_hf_dataset
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
