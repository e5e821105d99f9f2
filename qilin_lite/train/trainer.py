"""The trainer: trl's SFTTrainer with qilin-lite's overrides, and the callback that makes preemption safe.

Kept beside its arguments mapping (args.py), as trl keeps sft_trainer.py beside sft_config.py. stage.py
constructs it; a benchmark or test that needs another trainer subclasses it and passes the class to `train_stage`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from trl import SFTTrainer

from ..distributed import any_process
from ..families import family_of_config
from ..errors import UserError
from . import private_api
from .lm_head import plain_head_for, plain_head_ok, supervised_head
from ..model import (
    PROJECTOR_FILE,
    load_projector,
    projector_from_state_dict,
    save_projector,
    save_projector_state,
)
from .sampler import EpochGroupedSampler

log = logging.getLogger(__name__)

COMPLETE = ".qilin-complete"  # written into a checkpoint once everything in it is on disk


class Stopped(Exception):
    """Training stopped on SIGTERM after writing a checkpoint; `--resume` continues it (not an error: exit 0)."""


class Preemption(TrainerCallback):
    """SIGTERM (how clusters preempt) -> save a checkpoint at the next step boundary and stop; and a marker in
    each checkpoint once it is complete, so a kill mid-save never leaves a latest checkpoint that cannot load."""

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        self._previous = None

    def on_train_begin(self, args, state, control, **kwargs):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.requested = True
        log.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")

    def on_step_end(self, args, state, control, **kwargs):
        if any_process(self.requested):  # every process stops at the same step, or the collective save hangs
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                (ckpt / COMPLETE).write_text("", encoding="utf-8")

    def on_train_end(self, args, state, control, **kwargs):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class QilinTrainer(private_api.TrainerHooks, SFTTrainer):
    """trl's SFTTrainer with the overrides qilin-lite needs, grouped by purpose below (what reaches past trl's and
    transformers' public surface goes through private_api.py, whose TrainerHooks turns the Trainer's private hooks
    into the public methods overridden here):

    - settings: what a recipe adds to SFTConfig (length grouping, align-only saving, loss averaging, projector lr);
    - optimizer: the projector at its own learning rate;
    - data order: length grouping from precomputed lengths (the stock sampler would load every image to measure);
    - distributed: FSDP on CPU processes, fp32 gradient reduction under bf16 FSDP;
    - loss: the authors' per-batch averaging, and the loss without trl's per-micro-batch metrics;
    - host work: the Trainer's per-micro-batch walks and syncs skipped where their answer cannot change;
    - saving: align checkpoints hold the projector, not a copy of the LLM.
    """

    # ---------------------------------------------------------------- settings
    def __init__(self, *args, sample_lengths=None, align_only: bool = False, loss_average: str = "tokens",
                 projector_lr: float | None = None, lean_metrics: bool = False, **kwargs):
        """`sample_lengths`: each sample's length, which turns on length grouping (None: random order);
        `align_only`: checkpoints and the final save hold the projector alone; `loss_average`: "tokens" (every
        supervised token of an optimizer step weighs the same) or "batch" (each micro-batch's own mean, as the
        authors' transformers 4.31 Trainer); `projector_lr`: the projector's own rate (None: the model's);
        `lean_metrics`: compute trl's entropy / accuracy only for micro-batches that write a log."""
        private_api.check_versions()  # one line naming the package when trl / transformers / accelerate lack a reach
        super().__init__(*args, **kwargs)
        self.sample_lengths = sample_lengths
        self.align_only = align_only
        self.loss_average = loss_average
        if loss_average == "batch":
            self.loss_is_scaled_for_ga = False  # the Trainer then divides each micro-batch's mean by the accumulation
        self.projector_lr = projector_lr
        self.install_loss_head(lean=lean_metrics)

    # ---------------------------------------------------------------- optimizer
    def create_optimizer(self, model=None):
        # the projector at its own rate beside the LLM (LLaVA-1.5's mm_projector_lr); decay rules as the Trainer's
        if self.projector_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        projector = family_of_config(opt_model.config).projector.split(".")[-1] + "."  # the module's own name
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in opt_model.named_parameters():
            if p.requires_grad:
                groups.setdefault((projector in name, name in decay), []).append(p)
        param_groups = [
            {"params": ps, "weight_decay": self.args.weight_decay if dec else 0.0,
             **({"lr": self.projector_lr} if proj else {})}
            for (proj, dec), ps in sorted(groups.items())
        ]
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = cls(param_groups, **kwargs)
        return self.optimizer

    # ---------------------------------------------------------------- data order
    def train_sampler(self, train_dataset=None):
        if self.sample_lengths is not None:
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochGroupedSampler(batch, [int(x) for x in self.sample_lengths], seed)
        # the random order is accelerate's SeedableRandomSampler: also a function of seed and epoch alone
        return super().train_sampler(train_dataset)

    # ---------------------------------------------------------------- distributed
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        # accelerate turns FSDP on only for accelerator devices: with CPU processes it silently wraps the model
        # in DDP instead, every process holding everything. torch's FSDP2 itself shards over gloo, so the state
        # is put into FSDP mode here; on GPUs accelerate does this itself and this branch never runs.
        state = self.accelerator.state
        if self.args.fsdp_plugin_args is not None and state.distributed_type == DistributedType.MULTI_CPU:
            private_api.mark_fsdp(state)  # both shared states, as accelerate does
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            if state.mixed_precision != "no":  # bf16 compute through FSDP's own policy, as accelerate sets it
                state.fsdp_plugin.set_mixed_precision(state.mixed_precision)
            self.is_fsdp_enabled = True
        if self.is_fsdp_enabled and state.mixed_precision == "bf16":
            # accelerate's policy also reduces gradients in bf16 (8 mantissa bits for a sum over every GPU);
            # compute stays bf16 and the reduction goes to fp32, torchtitan's default and torch's advice
            from torch.distributed.fsdp import MixedPrecisionPolicy

            state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.bfloat16)

    # ---------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_average == "batch":
            # no global token count: trl takes this micro-batch's mean, the Trainer divides by the accumulation
            # steps (loss_is_scaled_for_ga is False) and DDP / DeepSpeed average over GPUs, which is what the
            # authors' LLaVA loss did. Long answers then weigh less per token than under "tokens".
            num_items_in_batch = None
        if not self.is_fsdp_enabled:
            if self._lean_now is not None and model.training and not return_outputs and not self._logs_now():
                return self._lean_loss(model, inputs, num_items_in_batch)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # trl's fused LM head reads lm_head.weight outside lm_head's forward. accelerate's FSDP2 shards
        # [final norm, lm_head] as a unit of their own, so that weight is still a sharded DTensor there, and its
        # gradient comes from this process's batch alone (measured on 2 processes: the lm_head gradient 40% off
        # the single-process one, every other parameter exact). The model's own forward calls lm_head as a
        # module, so FSDP gathers it and reduces its gradient; it costs the full logits in memory.
        return Trainer.compute_loss(self, model, {**inputs, "use_cache": False}, return_outputs, num_items_in_batch)

    # The loss without what only the log reads. trl's compute_loss also computes each token's entropy and top-1
    # hit in its fused LM head and gathers them (and the token count) across processes with host syncs, on
    # every micro-batch: 128 times per optimizer step in the QLoRA recipe (batch 1, 128 accumulated). Here only
    # the last micro-batch of a step that writes a log goes through trl's own path, so a log's entropy and
    # accuracy are that micro-batch's; the others go through a fused head that computes the log-probabilities
    # alone, giving the same loss to the bit. The token count is summed locally and gathered when a log is due.
    # On the CPU, where trl's head has no Triton kernel and scores every position in torch tiles, every
    # micro-batch (logging or not, training or evaluating) goes through lm_head.py's plain head over the
    # supervised positions instead: one numerics for every loss of a run, so resuming stays exact.
    _lean_now = None  # set by install_loss_head(lean=True): a one-item list, True while a lean micro-batch runs
    _pending_tokens = None  # real tokens seen by lean steps, added to trl's count when a log is written

    def install_loss_head(self, lean: bool) -> None:
        """Install one forward that answers trl's `fused_lm_head=True` calls: trl's fused head with or without the
        metric outputs (`lean`: without, for micro-batches that do not log), or the plain head on the CPU. It is
        installed before accelerate prepares the model, so accelerate's autocast wrapper still wraps it."""
        if self.compute_loss_func is not None or self.label_smoother is not None or self.aux_loss_enabled \
                or self.args.loss_type != "nll":
            return  # paths where trl needs the logits or extra outputs: keep its own compute_loss throughout
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        full = base.forward  # trl's: log-probabilities, entropy, top-1
        trimmed = private_api.fused_lm_head(base, outputs=("log_probs",)) if lean else full
        flag = [False]
        plain = plain_head_ok(base)

        def forward(_self, *args, **kwargs):
            if plain and kwargs.get("fused_lm_head") and plain_head_for(base.get_output_embeddings().weight.device):
                return supervised_head(base, *args, metrics=not flag[0], **kwargs)
            return (trimmed if flag[0] else full)(*args, **kwargs)

        private_api.replace_forward(base, forward)
        if lean:
            self._lean_now = flag

    def _logs_now(self) -> bool:
        """Will the optimizer step this micro-batch belongs to write a log? (The Trainer's own rule.)"""
        from transformers import IntervalStrategy

        if self.args.logging_strategy != IntervalStrategy.STEPS:
            return True  # epoch logging: no way to know the last step in advance; keep every metric
        if not self.accelerator.sync_gradients:
            return False  # not the last micro-batch of its optimizer step
        step = self.state.global_step + 1
        every = self.state.logging_steps or self.args.logging_steps
        return (self.args.logging_first_step and step == 1) or (every > 0 and step % int(every) == 0)

    def _lean_loss(self, model, inputs, num_items_in_batch):
        inputs["use_cache"] = False
        self._lean_now[0] = True
        try:
            outputs = model(**inputs, fused_lm_head=True)
        finally:
            self._lean_now[0] = False
        # trl's loss, term for term (SFTTrainer.compute_loss, the "nll" branch)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = (-outputs.log_probs).sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        seen = inputs["attention_mask"].sum() if "attention_mask" in inputs else \
            torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        self._pending_tokens = seen.detach() if self._pending_tokens is None else self._pending_tokens + seen
        return loss

    # ---------------------------------------------------------------- host work
    # Host work the Trainer repeats on every micro-batch although its answer does not change. Measured on the
    # paper's 13B model with LoRA (3,636 modules; benchmarks/host_work_vs_trainer.py): `model.train()` walks every module
    # and the FLOPs count walks every parameter, each ~10 ms of CPU, 128 times per optimizer step in the QLoRA
    # recipe (batch 1, 128 accumulated). And the NaN/inf filter on the logged loss reads each micro-batch's loss
    # back to the host, which stalls the CPU until the GPU is done instead of letting it queue the next
    # micro-batch's kernels. Here the walks are skipped when nothing can change and the filter stays on the
    # device: same weights to the bit and the same logs (tests/test_train_misc.py).
    _flops_per_token = None  # 6 x parameters (embeddings excluded), as the Trainer counts them
    _nan_filter = False  # the Trainer's `logging_nan_inf_filter`, applied in training_step instead
    _walk = None  # (model, its modules): for the train-mode check

    def train(self, *args, **kwargs):
        from transformers.utils import is_torch_xla_available

        keep = self.args.logging_nan_inf_filter
        self._nan_filter = keep and not is_torch_xla_available()  # the Trainer's own condition
        self.args.logging_nan_inf_filter = False
        try:
            return super().train(*args, **kwargs)
        finally:
            self.args.logging_nan_inf_filter = keep

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._walk is None or self._walk[0] is not model:
            self._walk = (model, list(model.modules()))
        # the Trainer calls model.train() first thing; when every module already trains (all steps but the
        # first and those after an evaluation) that call is a no-op walk, so it is made one for this step
        skip = all(m.training for m in self._walk[1])
        with private_api.train_mode_kept(model) if skip else contextlib.nullcontext():
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self._nan_filter:  # the Trainer's filter: a NaN/inf loss counts as the mean since the last log
            loss = torch.where(torch.isfinite(loss), loss, private_api.logged_loss_fallback(self))
        return loss

    def floating_point_ops(self, inputs):
        key = getattr(self.model, "main_input_name", "input_ids")
        if self._flops_per_token is None:  # the parameter count does not change while training
            self._flops_per_token = super().floating_point_ops({key: torch.empty(1)})
        return self._flops_per_token * inputs[key].numel() if key in inputs else 0

    def log(self, logs, start_time=None):
        if self._pending_tokens is not None and self.model.training:
            private_api.add_train_tokens(self, self.accelerator.gather_for_metrics(self._pending_tokens).sum().item())
            self._pending_tokens = None
        return super().log(logs, start_time)

    # ---------------------------------------------------------------- saving
    def save_weights(self, output_dir=None, state_dict=None):
        if not self.align_only:
            return super().save_weights(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        if state_dict is None:  # unsharded: read the projector from the model
            save_projector(self.accelerator.unwrap_model(self.model), Path(output_dir) / PROJECTOR_FILE)
        else:  # FSDP / ZeRO-3: the trainer gathered the full state dict on every process for this call
            save_projector_state(projector_from_state_dict(state_dict, self.model.config),
                                 Path(output_dir) / PROJECTOR_FILE)

    def save_training_state(self, output_dir, model_too: bool = True):
        # under FSDP the trainer would also write the whole frozen model (pytorch_model_fsdp.bin, 26 GB at 13B)
        # into every align checkpoint; the projector is already there, so that one write is skipped
        model_too = model_too and not (self.align_only and self.is_fsdp_enabled)
        return super().save_training_state(output_dir, model_too=model_too)

    def load_weights(self, resume_from_checkpoint, model=None):
        if self.align_only:
            load_projector(model or self.model, Path(resume_from_checkpoint) / PROJECTOR_FILE)
        elif full_checkpoint(Path(resume_from_checkpoint)) and not self.is_fsdp_enabled:
            # FSDP reloads its own state dict, in the model's names; the plain path needs the names mapped
            load_full_checkpoint(model or self.model, Path(resume_from_checkpoint))
        else:
            return super().load_weights(resume_from_checkpoint, model)


def full_checkpoint(path: Path) -> bool:
    """A checkpoint holding the whole model (--full), not an adapter."""
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def load_full_checkpoint(model, path: Path) -> None:
    """Load a --full checkpoint into `model`, every tensor or a one-line refusal. The Trainer's own reload passes the
    saved names (the release's: `language_model.model.*` for Llava) to a non-strict load_state_dict, which then
    loads nothing and says so in a warning only: a resumed full run went on from the base weights."""
    import json

    from ..weights import open_safetensors

    to_live = {saved: live for live, saved in private_api.saved_names(model).items()}
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = [path / f for f in sorted(set(index["weight_map"].values()))]
    keys = {}
    for f in files:
        with open_safetensors(f, "checkpoint") as h:
            keys[f] = list(h.keys())
    saved = {k for ks in keys.values() for k in ks}
    unexpected = sorted(saved - set(to_live))
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(set(model.state_dict()) - {to_live[k] for k in saved if k in to_live} - tied)
    if missing or unexpected:
        raise UserError(f"{path}: the checkpoint does not match the model ({len(missing)} weights missing, e.g. "
                        f"{(missing or ['-'])[0]}; {len(unexpected)} unknown, e.g. {(unexpected or ['-'])[0]}); "
                        "resume with the transformers version and recipe that wrote it")
    for f in files:  # a shard at a time: a 13B checkpoint is not held twice in memory
        with open_safetensors(f, "checkpoint") as h:
            model.load_state_dict({to_live[k]: h.get_tensor(k) for k in keys[f]}, strict=False)


def sharded_fraction(model) -> float:
    """Fraction of parameter elements held as FSDP shards (DTensors): 0 when a run silently fell back to DDP."""
    from torch.distributed.tensor import DTensor

    total = sharded = 0
    for p in model.parameters():
        total += p.numel()
        sharded += p.numel() if isinstance(p, DTensor) else 0
    return sharded / max(total, 1)


def trainable_to_fp32(model) -> None:
    """Trained weights live in fp32; frozen ones stay in the load dtype (bf16 on GPUs).

    A bf16 weight updated by AdamW loses every step smaller than its precision (at lr 2e-5 most of them), and the
    Trainer keeps no fp32 master copy on its own: `bf16=True` only adds autocast, which still computes in bf16.
    DeepSpeed keeps its own fp32 master weights, so it is left alone there.
    """
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def last_checkpoint(out: Path) -> str | None:
    """The newest checkpoint whose save completed (it holds the marker written after everything else)."""
    ckpts = sorted((p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    for i in range(len(ckpts) - 1, -1, -1):
        if (ckpts[i] / COMPLETE).exists():
            if i < len(ckpts) - 1:
                log.warning("%s is incomplete (the run was stopped while saving it); resuming from %s",
                            ", ".join(p.name for p in ckpts[i + 1:]), ckpts[i].name)
            return str(ckpts[i])
    if ckpts:
        raise UserError(f"{out}: no complete checkpoint to resume from ({', '.join(p.name for p in ckpts)} were cut "
                        "short while saving); delete them and start again without --resume")
    return None
