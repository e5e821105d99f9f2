"""Recipe -> trl SFTConfig: every setting the Trainer reads, mapped in one place (trl's sft_config.py beside
sft_trainer.py; ours beside trainer.py), with the trackers and distributed backends checked before any work.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Recipe, deepspeed_path
from ..distributed import world_size
from ..errors import UserError


def sft_config(recipe: Recipe, out: Path, wrap: list[str] | None = None):
    from trl import SFTConfig

    return SFTConfig(
        **trainer_settings(recipe, out, wrap),
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenized and truncated by encoding.py
        max_length=None,
    )


def dpo_config(recipe: Recipe, out: Path, wrap: list[str] | None = None):
    """prefer's settings: the same Trainer settings as tune's, and DPO's own (beta, the loss types). The reference's
    log-probabilities are computed beside the policy's in each step (not precomputed: the pairs carry images)."""
    from trl import DPOConfig

    return DPOConfig(
        **trainer_settings(recipe, out, wrap),
        beta=recipe.beta,
        loss_type=recipe.dpo_losses,
        precompute_ref_log_probs=False,
        disable_dropout=True,  # trl's default: the policy and its reference then score a pair the same way at step 0
        max_length=None,  # pairs.py cuts as training does
    )


def trainer_settings(recipe: Recipe, out: Path, wrap: list[str] | None = None) -> dict:
    """The transformers Trainer settings every stage shares, from the recipe."""
    tr = recipe.train
    cuda = torch.cuda.is_available()
    report = report_targets(tr.report_to)
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=tr.per_device_batch,
        gradient_accumulation_steps=tr.grad_accum(world_size()),
        learning_rate=tr.lr,
        optim=tr.optim,
        max_grad_norm=tr.max_grad_norm,
        num_train_epochs=tr.epochs,
        max_steps=tr.max_steps,
        lr_scheduler_type=tr.scheduler,
        warmup_steps=tr.warmup_ratio,  # trl 1.x: a float below 1 is a ratio of the total steps
        weight_decay=tr.weight_decay,
        # bf16 weights beside fp32 trained ones need autocast; fp32 weights get it when the recipe asks, on GPUs
        bf16=recipe.model.dtype == "bfloat16" or (tr.bf16 and cuda),
        fp16=recipe.model.dtype == "float16",
        tf32=tr.tf32 if cuda else None,
        # under FSDP its own checkpointing wraps the layers (fsdp_config); both at once is refused by transformers
        activation_checkpointing=tr.gradient_checkpointing and not tr.fsdp,
        activation_checkpointing_kwargs={"use_reentrant": tr.reentrant_checkpointing},
        logging_steps=tr.logging_steps,
        eval_strategy=("steps" if tr.eval_steps else "epoch") if recipe.data.eval else "no",
        eval_steps=tr.eval_steps or None,
        per_device_eval_batch_size=tr.per_device_batch,
        save_steps=tr.save_steps,
        save_total_limit=tr.save_total_limit,
        seed=tr.seed,
        deepspeed=deepspeed_path(tr.deepspeed),
        **fsdp_args(tr, wrap),
        report_to=report,
        dataloader_num_workers=recipe.data.num_workers,
        remove_unused_columns=False,  # our collator needs every field; nothing unused reaches it
        use_cpu=not cuda,
    )


def fsdp_units(model) -> list[str]:
    """Layer classes FSDP wraps one by one: the model's no-split blocks that it really contains (Llava lists
    CLIP text classes too, which accelerate would fail to find)."""
    from .private_api import no_split_modules

    names = set(no_split_modules(model))
    return sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in names})


def report_targets(setting: str) -> list[str] | str:
    """train.report_to -> the Trainer's report_to, checked here so a missing tracker is one line, not a traceback
    at the first logging step."""
    from transformers.integrations import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    available = get_available_reporting_integrations()
    if setting == "auto":
        return ["tensorboard"] if "tensorboard" in available else "none"
    wanted = [w.strip() for w in setting.split(",") if w.strip()]
    if wanted in ([], ["none"]):
        return "none"
    for w in wanted:
        if w not in INTEGRATION_TO_CALLBACK:
            raise UserError(f"train.report_to: unknown tracker '{w}'; choose from auto, none, "
                            f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
        if w not in available:
            raise UserError(f"train.report_to: {w} is not installed; pip install {w} (or set train.report_to=none)")
    return wanted


def fsdp_args(tr, wrap: list[str] | None) -> dict:
    """FSDP2 through accelerate, each decoder / vision layer its own unit, and a full state dict gathered at save
    time so the output directory is the same as a single-GPU run's."""
    options = tr.fsdp_options
    if options is None:
        return {}
    reshard, offload = options
    return {"fsdp": True, "fsdp_config": {
        "version": 2, "reshard_after_forward": reshard, "cpu_offload": offload,
        "transformer_layer_cls_to_wrap": wrap or None,
        "state_dict_type": "FULL_STATE_DICT", "activation_checkpointing": tr.gradient_checkpointing,
    }}


def check_optimizer(args, model) -> None:
    """A known optimizer whose package is not installed (torchao, galore-torch, schedulefree, ...) or that needs what
    a recipe cannot give: one line before the first step, not a traceback at it (config.py refuses unknown names)."""
    from transformers import Trainer

    try:
        Trainer.get_optimizer_cls_and_kwargs(args, model)
    except (ImportError, ValueError) as e:
        raise UserError(f"train.optim {args.optim.value}: {(str(e).splitlines() or [''])[0]}; install what it "
                        "names or choose another train.optim (adamw_torch is the authors')") from None


def check_deepspeed(name: str | None) -> None:
    """A recipe naming DeepSpeed where it is not installed: one line with both ways out."""
    import importlib.util

    deepspeed_path(name)
    if name and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"train.deepspeed names {name} but DeepSpeed is not installed; pip install deepspeed "
                        "(multi-GPU), or train without it: --set train.deepspeed=none")
