"""`qilin-lite prefer`: DPO (and the loss variants of trl's DPOTrainer) on preference pairs, from a trained run.

In:  a recipe of stage "prefer": `model.from_run` (a lora / qlora tune run, or an align, merged, full or converted
     run, or a released model), pairs in `data.train` (pairs.py), train.mode lora / qlora / full, train.beta,
     train.dpo_loss.
Out: an output directory with the same contract as tune's (qilin.json, the adapter or the whole model, recipe.yaml,
     log_history.json, train_summary.json): chat, eval, merge, export and web read it as they read a tune run.

The reference is the starting policy. With LoRA it is not a second copy of the model: starting from a LoRA tune run,
that adapter trains on and trl keeps a frozen copy of it as the reference adapter; starting from whole weights, a
new adapter trains and the reference is the model with adapters disabled. --full loads the reference once more.
The projector stays as it came unless train.projector=train.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from trl import DPOTrainer

from ..config import Recipe
from ..errors import UserError
from ..train import private_api, run_dir
from ..train.trainer import full_checkpoint, load_full_checkpoint, trainable_to_fp32

log = logging.getLogger(__name__)

REF_ADAPTER = "ref"  # the name trl gives the frozen copy of a pretrained adapter


class PreferTrainer(private_api.PreparedPairs, private_api.TrainerHooks, DPOTrainer):
    """trl's DPOTrainer on pairs encoded by the family's template (pairs.py), resuming --full checkpoints under
    their saved names (trainer.load_full_checkpoint)."""

    def __init__(self, *args, projector_trains: bool = False, **kwargs):
        private_api.check_versions()
        super().__init__(*args, **kwargs)
        self.projector_trains = projector_trains

    def load_weights(self, resume_from_checkpoint, model=None):
        if full_checkpoint(Path(resume_from_checkpoint)) and not self.is_fsdp_enabled:
            return load_full_checkpoint(model or self.model, Path(resume_from_checkpoint))
        done = super().load_weights(resume_from_checkpoint, model)
        if not self.projector_trains:
            # peft's load_adapter(is_trainable=True) makes every adapter weight trainable again, the projector's
            # copy too: a resumed run would train what the first run froze (and its optimizer state not fit)
            from ..train.stages import freeze_projector

            freeze_projector(model or self.model)
        return done


def run_prefer(recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
               trainer_cls: type = PreferTrainer) -> Path:
    from ..train.stage import prepare_output, save_outputs, train

    if recipe.stage != "prefer":
        raise UserError(f"run_prefer takes a prefer recipe, not stage {recipe.stage}")
    if recipe.train.fsdp or recipe.train.deepspeed:
        raise UserError("prefer runs on one process here (the reference pass is not checked under FSDP / ZeRO); "
                        "drop train.fsdp / train.deepspeed")
    t0 = time.time()
    out = prepare_output(recipe, resume, overwrite)
    try:
        base, model, ref_model, tokenizer, image_processor = load_policy(recipe, out)
        dataset, n_rejected = build_pairs(recipe, tokenizer, image_processor, model.config, out)
        trainer = build_trainer(trainer_cls, recipe, model, ref_model, tokenizer, dataset, out)
        train(trainer, out, resume)
        inner = trainer.accelerator.unwrap_model(trainer.model)
        if REF_ADAPTER in getattr(inner, "peft_config", {}):
            inner.delete_adapter(REF_ADAPTER)  # the frozen reference is the run it started from, not part of this one
        save_outputs(trainer, recipe, out, base, tokenizer, image_processor)
        write_summary(trainer, recipe, out, len(dataset), n_rejected, time.time() - t0)
    finally:
        run_dir.release(out)
    return out


def load_policy(recipe: Recipe, out: Path):
    """(base the output builds on, policy, reference model or None, tokenizer, image processor)."""
    from ..model import RunInfo, load_run, load_vlm, resolve_base
    from ..train.stage import load_model
    from ..train.stages import freeze_projector, keep_4bit_differentiable, trainable_summary
    from ..device import training_placement

    m, tr = recipe.model, recipe.train
    info = RunInfo.load(Path(m.from_run)) if m.from_run else None
    if info is not None and info.kind in ("lora", "qlora"):
        if tr.mode == "full":
            raise UserError(f"{m.from_run} is a {info.kind} run: --full needs whole weights; merge it first "
                            f"(qilin-lite merge {m.from_run} MERGED) or prefer with --lora / --qlora")
        where = training_placement(dtype=m.dtype, attn=m.attn, bits=recipe.llm_bits, sharded=False)
        from transformers import set_seed

        set_seed(tr.seed)
        model, tokenizer, image_processor, _ = load_run(m.from_run, bits=recipe.llm_bits, dtype=where.dtype,
                                                        attn=where.attn, trainable=True, device_map=where.device_map)
        model.config.use_cache = False
        keep_4bit_differentiable(model)
        if not recipe.projector_trains:
            freeze_projector(model)
        if tr.gradient_checkpointing:
            model.enable_input_require_grads()
        trainable_to_fp32(model)
        log.info("continuing the adapter of %s; its frozen copy is the reference. %s", m.from_run,
                 trainable_summary(model))
        return resolve_base(Path(m.from_run), info), model, None, tokenizer, image_processor
    base, model, tokenizer, image_processor = load_model(recipe, out)
    ref = None
    if tr.mode == "full":  # whole weights train: the reference is a second, frozen copy of the start
        where = training_placement(dtype=m.dtype, attn=m.attn, bits=None, sharded=False)
        ref = load_vlm(base, dtype=where.dtype, attn=where.attn, device_map=where.device_map)
        from ..model import load_projector, PROJECTOR_FILE

        if info is not None and info.kind == "align":
            load_projector(ref, Path(m.from_run) / PROJECTOR_FILE)
        ref.requires_grad_(False).eval()
    return base, model, ref, tokenizer, image_processor


def build_pairs(recipe: Recipe, tokenizer, image_processor, model_config, out: Path):
    from ..data.records import Reject
    from ..families import get_template
    from ..images.pixel_values import image_loader
    from ..model import image_mode_for, token_layout
    from .pairs import PairDataset, check_pairs, read_pairs

    d = recipe.data
    rejects: list[Reject] = []
    pairs = read_pairs(d.train, d.image_folder, skip_bad=d.skip_bad, rejects=rejects,
                       allow_outside_images=d.allow_outside_images)
    template = get_template(recipe.template)
    layout = token_layout(model_config, d.max_length, d.length_mode)
    images = image_loader(image_processor, image_mode_for(model_config, d.image_mode, recipe.image_mode))
    dataset = PairDataset(pairs, tokenizer, images, template, layout)
    check_pairs(pairs, dataset, d.skip_bad, rejects, out)
    log.info("%d preference pairs (%d set aside)", len(dataset), len(rejects))
    return dataset, len(rejects)


def build_trainer(trainer_cls, recipe: Recipe, model, ref_model, tokenizer, dataset, out: Path):
    from ..train.args import check_optimizer, dpo_config
    from .pairs import PairCollator, as_pair_dataset

    if recipe.data.packing:
        raise UserError("prefer does not pack: each pair's two replies are scored side by side; drop --packing")
    args = dpo_config(recipe, out)
    check_optimizer(args, model)
    trainer = trainer_cls(model=model, ref_model=ref_model, args=args, train_dataset=as_pair_dataset(dataset),
                          data_collator=PairCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                          projector_trains=recipe.projector_trains)
    trainable_to_fp32(trainer.model)
    return trainer


def write_summary(trainer, recipe: Recipe, out: Path, pairs: int, rejected: int, seconds: float) -> None:
    from ..train.stage import write_loss_curve

    if not trainer.args.should_save:
        return
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    write_loss_curve(history, out / "loss.png", title=f"prefer ({recipe.train.mode}, {recipe.train.dpo_loss})")
    rows = [h for h in history if "rewards/margins" in h]
    summary = {"stage": "prefer", "mode": recipe.train.mode, "samples": pairs, "rejected": rejected,
               "steps": trainer.state.global_step, "seconds": round(seconds, 1), "beta": recipe.beta,
               "loss_type": recipe.dpo_losses,
               "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
               "first_margin": rows[0]["rewards/margins"] if rows else None,
               "final_margin": rows[-1]["rewards/margins"] if rows else None}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
