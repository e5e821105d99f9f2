"""Recipe -> trained output directory (the contract later commands read), as a short sequence of named steps:

    prepare the output -> load the model -> build the datasets -> build the trainer -> train -> save -> summary

`align` writes the projector; `tune --lora/--qlora` a peft adapter that also holds the trained projector;
`tune --full` a complete Llava directory. Each step lives in its own room: the data checks in data.py, the
trainer in trainer.py beside its arguments mapping (args.py), the process helpers in ../distributed.py.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from . import private_api, run_dir, segments
from ..base_identity import identify
from ..config import Recipe
from ..device import training_placement
from ..distributed import world_size
from ..errors import UserError
from ..model import (
    PROJECTOR_FILE,
    RunInfo,
    assemble_base,
    image_mode_for,
    token_layout,
    load_vlm,
    load_projector,
    load_tokenizer_and_processor,
    resolve_base,
    save_processor,
)
from ..images.pixel_values import set_pixel_bounds
from .packing import PackedDataset, choose_packing
from .collator import Collator
from .dataset import as_hf_dataset
from .stages import LoraSettings, configure, keep_4bit_differentiable, trainable_summary
from .args import check_deepspeed, check_optimizer, fsdp_units, report_targets, sft_config
from .data import build_dataset
from . import task_eval
from .finite import NonFinite
from .trainer import Preemption, QilinTrainer, Stopped, last_checkpoint, sharded_fraction, trainable_to_fp32

log = logging.getLogger(__name__)

__all__ = ["run_stage", "train_stage", "Stopped"]


def run_stage(recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
              trainer_cls: type = QilinTrainer) -> Path:
    """Train one stage as the recipe says; return the output directory."""
    return train_stage(recipe, resume=resume, overwrite=overwrite, trainer_cls=trainer_cls)[0]


def train_stage(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, trainer_cls: type = QilinTrainer):
    """Train one stage; return (output directory, the trained model as it is in memory).

    `overwrite` replaces a finished run in the output directory; `trainer_cls` is QilinTrainer or a subclass of it
    (benchmarks and tests add probes that way)."""
    t0 = time.time()
    task_eval.check(recipe, sharded=bool(recipe.train.fsdp) or zero_stage(recipe.train.deepspeed) == 3)
    task_items = task_eval.load_task_items(recipe) if recipe.data.eval_task else None  # before any model loads
    metric = task_eval.followed_metric(recipe, task_items) if task_items is not None else None
    out = prepare_output(recipe, resume, overwrite)
    try:  # the output directory stays claimed until its run ends (run_dir.py)
        base, model, tokenizer, image_processor = load_model(recipe, out)
        data = build_datasets(recipe, tokenizer, image_processor, model.config, out)
        attention = packed_attention(model, data)
        trainer = build_trainer(trainer_cls, recipe, model, tokenizer, data, out)
        task = None
        if task_items is not None:
            task = task_eval.TaskEval(recipe, task_items, tokenizer, image_processor, model.config, out, metric=metric)
        train(trainer, out, resume, task)
        if task is not None:
            task_eval.finish(trainer, task)
        if attention is not None:  # the saved model attends as it was loaded; segments are for packed training only
            segments.use(model, attention)
        save_outputs(trainer, recipe, out, base, tokenizer, image_processor)
        write_summary(trainer, recipe, out, data, time.time() - t0)
    finally:
        run_dir.release(out)
    return out, trainer.model


def zero_stage(deepspeed: str | None) -> int | None:
    """The ZeRO stage a DeepSpeed config names (None without one, or where the file does not say)."""
    from ..config import deepspeed_path

    path = deepspeed_path(deepspeed)
    if not path:
        return None
    try:
        return int(json.loads(Path(path).read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage"))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def packed_attention(model, data: "Datasets") -> str | None:
    """Packed rows without flash-attn train with per-sample attention (FlexAttention's document mask on a CUDA GPU,
    segments.py's per-span sdpa elsewhere); returns the implementation to switch back to before saving, or None when
    nothing was switched."""
    from ..device import cuda

    current = private_api.attention_of(model.config.get_text_config())
    data.attention = current
    if not isinstance(data.train, PackedDataset) or current == "flash_attention_2":
        return None
    kernel = segments.packed_kernel(cuda())
    data.attention = kernel
    log.info("packed rows: each sample attends only to itself (%s, instead of %s over the whole row)", kernel, current)
    return segments.use(model, kernel)


def prepare_output(recipe: Recipe, resume: bool, overwrite: bool = False) -> Path:
    """Check everything that can fail without work, then claim the output: one run at a time, never over a finished
    run without --overwrite or into a folder of the user's, never a --resume with other settings or data
    (run_dir.py)."""
    check_before_work(recipe)
    return run_dir.prepare(recipe, resume, overwrite)


def check_before_work(recipe: Recipe) -> None:
    """What can be refused before anything is read, loaded or written: every recipe field and rule, the template,
    the tracker, DeepSpeed, and the library versions (tests/test_recipe_fuzz.py runs hostile recipes through it)."""
    recipe.check()
    settle_template(recipe)
    report_targets(recipe.train.report_to)  # a missing tracker fails now, not after minutes of data checks
    check_deepspeed(recipe.train.deepspeed)  # so does a DeepSpeed config without DeepSpeed
    private_api.check_versions()  # and a trl / transformers / accelerate without what private_api.py reaches


def settle_template(recipe: Recipe) -> None:
    """A tune recipe that names no template takes the model's own: a converted or earlier-tuned model's (HuatuoGPT-
    Vision keeps `huatuo`), else its LLM's dialog format (ChatML for Qwen2, vicuna_v1 for LLaMA). Settled before
    recipe.yaml is written, so the run records it and --resume compares it."""
    from ..families import get_template, guess_template
    from ..model import template_of

    d, m = recipe.data, recipe.model
    if not d.template and recipe.stage == "align" and m.base:
        from ..model import family_at

        # a released model aligns in its own format where it has no captioning one (Qwen2.5-VL); a Llava in `plain`
        d.template = family_at(m.base, m.trust_remote_code).align_template
        return
    if d.template or recipe.stage not in ("tune", "prefer", "reinforce"):
        return
    source = m.base
    if m.from_run:
        info = RunInfo.load(Path(m.from_run))
        source = resolve_base(Path(m.from_run), info) if info is not None and info.kind == "align" else m.from_run
    found = template_of(source) if source else guess_template(m.llm)
    d.template = found if get_template(found).dialog else guess_template(source)
    log.info("template: %s (the model's own; --set data.template=NAME to choose another)", d.template)


def resolve_base_for(recipe: Recipe, out: Path) -> tuple[str, Path | None]:
    """(base model to load, projector file to start from)."""
    m = recipe.model
    if m.from_run:
        src = Path(m.from_run)
        info = RunInfo.load(src)
        if info is not None and info.kind in ("converted", "merged", "full"):
            return str(src), None  # a whole model (HuatuoGPT-Vision converted, an earlier run merged): tuned on
        if info is None and released_model(str(m.from_run)):
            return str(m.from_run), None  # a release (Lingshu-7B, Qwen2.5-VL, a Llava): tuned as it ships
        if info is None or info.kind != "align":
            raise UserError(f"{src}: not an align output directory or a whole model (no qilin.json of kind 'align', "
                            "'converted', 'merged' or 'full', and no config.json); pass --from ALIGN_DIR, a model "
                            "directory or a hub id")
        return resolve_base(src, info), src / PROJECTOR_FILE
    if m.base:
        return m.base, None
    if recipe.stage == "tune":
        log.warning("tuning without --from: the projector starts untrained (the paper starts from the align stage)")
    base_dir = out / "base"
    if not (base_dir / "config.json").exists():
        log.info("joining %s and %s into %s", m.vision, m.llm, base_dir)
        assemble_base(
            m.vision, m.llm, base_dir, projector=m.projector, vision_feature_layer=m.vision_feature_layer,
            dtype=m.dtype, template=recipe.template, trust_remote_code=m.trust_remote_code, projector_init=m.projector_init,
            allow_pickle=m.allow_pickle, seed=recipe.train.seed,
        )
    return str(base_dir), None


def released_model(source: str) -> bool:
    """A model directory qilin-lite did not write (its config.json, no qilin.json), or a hub id (`owner/name`, not
    a local path)."""
    p = Path(source)
    if p.exists():
        return (p / "config.json").is_file()
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def load_model(recipe: Recipe, out: Path):
    """The base model with this stage's trainable parameters: (base it came from, model, tokenizer, processor)."""
    tr, m = recipe.train, recipe.model
    base, projector = resolve_base_for(recipe, out)
    where = training_placement(dtype=m.dtype, attn=m.attn, bits=recipe.llm_bits, sharded=bool(tr.deepspeed or tr.fsdp))
    model = load_vlm(base, bits=recipe.llm_bits, dtype=where.dtype, attn=where.attn, device_map=where.device_map,
                       trust_remote_code=m.trust_remote_code, allow_pickle=m.allow_pickle)
    # No KV cache in training: it is useless there, conflicts with checkpointing, and with a cache transformers
    # skips the packed-sequence detection, so packed samples would silently attend to each other.
    model.config.use_cache = False
    model.config.get_text_config().use_cache = False
    if recipe.llm_bits:  # evaluation mid-training (--eval-data, --eval-task) must not repack the 4-bit weights
        keep_4bit_differentiable(model)
    tokenizer, image_processor = load_tokenizer_and_processor(base)
    set_pixel_bounds(image_processor, recipe.data.min_pixels, recipe.data.max_pixels)  # saved with the run
    if projector is not None:
        load_projector(model, projector)
    # LoRA's A matrices are drawn here, before the Trainer seeds anything: seed now, so a run is reproducible and
    # every process draws the same adapter (FSDP keeps each process's own shard as it finds it, unsynchronised)
    from transformers import set_seed

    set_seed(tr.seed)
    lora = LoraSettings(tr.lora_r, tr.lora_alpha, tr.lora_dropout)
    model = configure(model, tr.mode, lora, gradient_checkpointing=tr.gradient_checkpointing,
                      projector_trains=recipe.stage == "align" or recipe.projector_trains)
    if not tr.deepspeed:
        trainable_to_fp32(model)
    log.info(trainable_summary(model))
    return base, model, tokenizer, image_processor


@dataclass
class Datasets:
    train: object  # VisionTextDataset, or PackedDataset over it
    eval: object | None
    samples: int  # records kept (before packing)
    rejected: int
    lengths: object  # each training row's length, for length grouping
    packing: object | None = None  # packing.PackingChoice when --packing chose the layout
    attention: str | None = None  # the language model's attention while training (train_summary.json)


def build_datasets(recipe: Recipe, tokenizer, image_processor, model_config, out: Path) -> Datasets:
    """The checked training set (packed when asked and worth it) and the held-out set."""
    tr, d = recipe.train, recipe.data
    if d.packing and token_layout(model_config, d.max_length).marks:
        # a packed row restarts positions per sample, and these models compute positions (Qwen2.5-VL's M-RoPE) or
        # image attention (Gemma 3) from each sample's image-token marks: transformers does not per packed sample
        raise UserError("data.packing: this model's image positions or image attention do not survive packing; "
                        "leave --packing off (length grouping still keeps padding low)")
    dataset, n_rejected = build_dataset(recipe, tokenizer, image_processor, model_config, out)
    n_samples = len(dataset)
    # eval rows are never packed: each sample's loss counts as it would alone
    eval_set = build_dataset(recipe, tokenizer, image_processor, model_config, out, source=d.eval)[0] if d.eval else None
    packing = None
    if d.packing and d.packing_row_length:
        dataset = PackedDataset(dataset, d.packing_row_length)
        log.info("packed %d samples into %d rows of at most %d tokens (data.packing_row_length)", n_samples,
                 len(dataset), d.packing_row_length)
    elif d.packing:
        packing = choose_packing(dataset.lengths, tr.per_device_batch, d.max_length,
                                 private_api.attention_of(model_config) or "sdpa", model_config.get_text_config(),
                                 seed=tr.seed, grouped=d.group_by_length, accumulation=tr.grad_accum(world_size()))
        (log.info if packing.row_length == d.max_length else log.warning)("--packing: %s", packing.reason)
        if packing.row_length is not None:
            dataset = PackedDataset(dataset, packing.row_length)
            log.info("packed %d samples into %d rows of at most %d tokens", n_samples, len(dataset),
                     packing.row_length)
    return Datasets(dataset, eval_set, n_samples, n_rejected, dataset.lengths, packing)


def build_trainer(trainer_cls: type, recipe: Recipe, model, tokenizer, data: Datasets, out: Path):
    tr = recipe.train
    args = sft_config(recipe, out, wrap=fsdp_units(model) if tr.fsdp else None)
    check_optimizer(args, model)
    # transformers refuses to train a quantized model that has no peft adapter, to stop runs in which nothing can
    # learn. align with a 4-bit LLM trains the full-precision projector, so that guard does not apply: it is told
    # the model carries its own trainable part for the duration of the constructor only.
    quantized_align = recipe.llm_bits is not None and tr.mode == "align"
    if quantized_align:
        assert any(p.requires_grad for p in model.parameters())
        private_api.peft_loaded(model, True)
    try:
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=as_hf_dataset(data.train),
            eval_dataset=as_hf_dataset(data.eval) if data.eval is not None else None,
            data_collator=Collator(tokenizer.pad_token_id),
            processing_class=tokenizer,
            sample_lengths=data.lengths if recipe.data.group_by_length else None,
            align_only=tr.mode == "align",
            loss_average=tr.loss_average,
            projector_lr=tr.projector_lr if tr.mode != "align" else None,
            lean_metrics=tr.lean_metrics,
        )
    finally:
        if quantized_align:
            private_api.peft_loaded(model, False)
    if trainer.is_fsdp_enabled and recipe.llm_bits:  # FSDP from an accelerate config, where check() cannot see it
        raise UserError("FSDP does not shard 4-bit weights here; launch QLoRA / --load-4bit without FSDP")
    if not tr.deepspeed or not (args.bf16 or args.fp16):
        # again: trl casts every trainable parameter of a quantized model to bf16 in its constructor. DeepSpeed in
        # bf16/fp16 casts the model itself and keeps fp32 masters; in fp32 it trains the parameters as they are, and
        # DeepSpeed turns autocast off, so a bf16 projector would meet fp32 image features (the QLoRA + ZeRO crash)
        trainable_to_fp32(trainer.model)
    return trainer


def train(trainer, out: Path, resume: bool, task=None) -> None:
    """Run the Trainer (from the last complete checkpoint with --resume); a SIGTERM stop raises Stopped. `task`: a
    task_eval.TaskEval, attached last: a SIGTERM save is asked for before a benchmark is answered, and a save the
    non-finite guard cancels is never marked the best checkpoint."""
    preemption, guard = Preemption(), NonFinite()
    trainer.add_callback(preemption)
    trainer.add_callback(guard)  # after Preemption: it can cancel the save a SIGTERM asked for
    if task is not None:
        task.attach(trainer)
    start = last_checkpoint(out) if resume else None
    if resume and start is None:
        log.warning("--resume: %s has no checkpoint yet; training from the start", out)
    trainer.train(resume_from_checkpoint=start)
    if guard.problem is not None:
        raise UserError(f"{out}: training stopped at step {guard.step}: {guard.problem}; {_kept(out)}, no model was "
                        f"saved; lower train.lr ({trainer.args.learning_rate}) or check the data, then train into a "
                        "new --out")
    if preemption.stopped_at is not None:
        raise Stopped(f"stopped by SIGTERM after step {preemption.stopped_at}; checkpoint-{preemption.stopped_at} "
                      f"is saved in {out}; run the same command with --resume to continue")


def _kept(out: Path) -> str:
    try:
        last = last_checkpoint(out)
    except UserError:  # only checkpoints cut short while saving
        last = None
    return f"{Path(last).name} holds the last finite weights" if last else "no checkpoint had been saved before it"


def write_summary(trainer, recipe: Recipe, out: Path, data: Datasets, seconds: float) -> None:
    """log_history.json, loss.png and train_summary.json, from the main process."""
    tr = recipe.train
    sharded = sharded_fraction(trainer.model) if trainer.is_fsdp_enabled else None
    if sharded is not None:
        log.info("FSDP held %.0f%% of the parameters sharded across %d processes", 100 * sharded, world_size())
    if not trainer.args.should_save:  # one writer when several processes train
        return
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    write_loss_curve(history, out / "loss.png", title=f"{recipe.stage} ({tr.mode})")
    summary = {
        "stage": recipe.stage, "mode": tr.mode, "samples": data.samples, "rows": len(data.train),
        "rejected": data.rejected, "steps": trainer.state.global_step, "seconds": round(seconds, 1),
        "processes": world_size(), "attention": data.attention,
        "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
    }
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    if evals:
        summary["eval_samples"], summary["final_eval_loss"] = len(data.eval), evals[-1]
    packing = data.packing
    if packing is not None:  # what --packing did and the estimate it went by
        summary["packing"] = {"row_length": packing.row_length, "attention": packing.attention,
                              "work_vs_unpacked": round(packing.work_vs_unpacked, 3),
                              "rows_of_max_length_vs_unpacked": round(packing.packed_at_max_vs_unpacked, 3),
                              "reason": packing.reason}
    if sharded is not None:
        summary["fsdp_sharded_fraction"] = round(sharded, 4)
        policy = trainer.accelerator.state.fsdp_plugin.mixed_precision_policy
        if policy is not None:  # bf16: what FSDP computed in and what it reduced gradients in
            summary["fsdp_dtypes"] = {k: str(getattr(policy, f"{k}_dtype")).replace("torch.", "")
                                      for k in ("param", "reduce")}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")


def save_outputs(trainer, recipe: Recipe, out: Path, base: str, tokenizer, image_processor) -> None:
    """Weights through the trainer (it gathers FSDP / ZeRO-3 shards on every process and writes on the main one),
    then the files later commands read, from the main process only."""
    mode = recipe.train.mode
    # align: the trainer's save_weights writes the projector only; lora/qlora: a peft adapter that also holds the
    # trained projector (modules_to_save); full: a complete Llava directory
    trainer.save_model(str(out))
    if not trainer.args.should_save:
        return
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; recipe.yaml already records every setting
    kind = "full" if mode == "full" else mode
    # what the adapter / projector was trained on, so merge can refuse another base at that path or of that shape
    trained_on = None if mode == "full" else identify(base)
    model = trainer.accelerator.unwrap_model(trainer.model)
    image_mode = image_mode_for(model.config, recipe.data.image_mode, recipe.image_mode)
    RunInfo(kind, None if mode == "full" else _portable(base, out), recipe.template, image_mode,
            base_identity=trained_on).save(out)
    save_processor(out, tokenizer, image_processor, model.config, recipe.template)


def _portable(base: str, out: Path) -> str:
    """Local bases are stored relative to the run when inside it (the directory can move), else absolute."""
    p = Path(base)
    if p.exists():
        p = p.resolve()
        try:
            return str(p.relative_to(out.resolve()))
        except ValueError:
            return str(p)
    return base  # a hub id


def write_loss_curve(history: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], label="training")
    if evals:
        ax.plot([p[0] for p in evals], [p[1] for p in evals], "o-", label="eval (held out)")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
