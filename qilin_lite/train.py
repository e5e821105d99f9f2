"""Recipe -> trl SFTTrainer run -> output directory (the contract later commands read).

setup (base model, trainable parameters, records, dataset) -> train (SFTTrainer) -> save (weights, processor,
qilin.json, resolved recipe, loss curve). `align` writes the projector; `tune --lora/--qlora` a peft adapter that
also holds the trained projector; `tune --full` a complete Llava directory.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .config import Recipe, save_recipe
from .conversation import get_template
from .errors import UserError
from .model import (
    PROJECTOR_FILE,
    RunInfo,
    assemble_base,
    load_llava,
    load_projector,
    load_tokenizer_and_processor,
    projector_from_state_dict,
    resolve_base,
    save_processor,
    save_projector,
    save_projector_state,
    token_layout,
)
from .processing import (
    Collator,
    EpochGroupedSampler,
    ImageLoader,
    PackedDataset,
    VisionTextDataset,
    as_hf_dataset,
    choose_packing,
    sample_lengths,
)
from .records import Reject, Record, read_records, write_rejects
from .stages import LoraSettings, configure, trainable_summary

log = logging.getLogger(__name__)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def my_share(n: int) -> range:
    """The indices of n items this process works on when each takes every world_size()-th one."""
    return range(rank(), n, world_size())


def gather_dicts(local: dict) -> dict:
    """The union of every process's `local` (itself when there is one process), the same on every process."""
    if world_size() == 1:
        return local
    import torch.distributed as dist
    from accelerate import PartialState

    PartialState()  # joins the process group torchrun prepared (the Trainer would, a little later)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def resolve_base_for(recipe: Recipe, out: Path) -> tuple[str, Path | None]:
    """(base model to load, projector file to start from)."""
    m = recipe.model
    if m.from_run:
        src = Path(m.from_run)
        info = RunInfo.load(src)
        if info is None or info.kind != "align":
            raise UserError(f"{src}: not an align output directory (no qilin.json of kind 'align'); pass --from ALIGN_DIR")
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


def shared_lengths(records: list[Record], template, tokenizer, layout):
    """`sample_lengths`, each process tokenizing its share and all getting every result (as `verify_images`)."""
    if world_size() == 1:
        return sample_lengths(records, template, tokenizer, layout)
    mine = list(my_share(len(records)))
    part, part_bad = sample_lengths([records[i] for i in mine], template, tokenizer, layout)
    found = gather_dicts({i: int(n) for i, n in zip(mine, part)})
    bad = gather_dicts({mine[j]: reason for j, reason in part_bad.items()})
    return np.array([found[i] for i in range(len(records))], dtype=np.int64), bad


def verify_images(records: list[Record], rejects: list[Reject], skip_bad: bool, workers: int = 4,
                  verdicts=None) -> list[Record]:
    """Decode every image once so a corrupt file is reported before training, not hours into it.

    `verdicts` (datacache.ImageVerdicts) remembers what each unchanged file gave, so a rerun decodes only new ones."""
    from .images import load_image

    def check(rec: Record):
        for ref in rec.images:
            if not isinstance(ref, Path):
                continue
            if verdicts is not None:
                known, problem = verdicts.known(ref)
                if known:
                    if problem:
                        return problem
                    continue
            try:
                load_image(ref)
            except UserError as e:
                if verdicts is not None:
                    verdicts.record(ref, str(e))
                return str(e)
            if verdicts is not None:
                verdicts.record(ref, None)
        return None

    # each process decodes its share (8 GPUs: an eighth each, not eight times everything) and all learn every
    # verdict, so every process drops the same records and the ranks' datasets stay identical
    mine = my_share(len(records))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = {i: problem for i, problem in zip(mine, pool.map(check, [records[i] for i in mine])) if problem}
    found = gather_dicts(found)
    if verdicts is not None:
        verdicts.entries = gather_dicts(verdicts.entries)
        if rank() == 0:
            verdicts.save()  # before any error below: the next attempt skips what was decoded
    kept = []
    for i, rec in enumerate(records):
        problem = found.get(i)
        if problem is None:
            kept.append(rec)
        elif skip_bad:
            rejects.append(Reject(rec.source, rec.line, rec.id, problem))
        else:
            raise UserError(f"{rec.where}: {problem} (or pass --skip-bad to set such records aside)")
    return kept


def _write_rejects_once(rejects: list[Reject], out: Path) -> Path:
    """Every process finds the same records bad before training; one of them writes the list."""
    if rejects and rank() == 0:
        write_rejects(rejects, out)
    return out / "rejects.jsonl"


def build_dataset(recipe: Recipe, tokenizer, image_processor, model_config, out: Path, source: str | None = None):
    """The training set (or `source`, e.g. the eval file) under the same rules: records, images, lengths.

    The checked records go to an on-disk index (datacache.py) that every rank and DataLoader worker shares; a
    restart on the same data, tokenizer and settings reuses it instead of checking everything again."""
    from .datacache import CACHE_DIR, RecordIndex, data_key, file_identity, tokenizer_identity
    from .records import is_data_file, open_hf_dataset

    d = recipe.data
    source = source or d.train
    template = get_template(recipe.template)
    layout = token_layout(model_config, d.max_length, d.length_mode)
    key = data_key({
        "data": file_identity(source), "image_folder": str(Path(d.image_folder).resolve()) if d.image_folder else None,
        "tokenizer": tokenizer_identity(tokenizer), "template": [template.name, template.system], "layout": layout,
        "verify_images": d.verify_images, "skip_bad": d.skip_bad, "hf": [d.split, d.image_column, d.messages_column],
    })
    index_dir = out / CACHE_DIR / key
    hf = None if is_data_file(source) else open_hf_dataset(str(source), d.split)
    index = RecordIndex.load(index_dir, hf)
    if index is not None:
        log.info("reusing the records checked before (%s): %d records, %d set aside then (see rejects.jsonl)",
                 index_dir, len(index), index.meta["rejected"])
    else:
        records, lengths, rejects = _check_records(recipe, source, tokenizer, template, layout, out)
        if rank() == 0:
            RecordIndex.write(index_dir, records, lengths, {"records": len(records), "rejected": len(rejects),
                                                            "source": str(source)})
        del records  # from here on the index serves them: 16 bytes a record in memory, none copied per worker
        _release_freed_memory()
        if world_size() > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()
        index = RecordIndex.load(index_dir, hf)
        if index is None:
            raise RuntimeError(f"{index_dir}: the record index just written cannot be read back")
    dataset = VisionTextDataset(
        index, tokenizer, ImageLoader(image_processor, recipe.image_mode), template, layout, index.lengths,
        rejects_path=out / "rejects.jsonl",
    )
    return dataset, int(index.meta["rejected"])


def _release_freed_memory() -> None:
    """Hand the checks' freed Python objects back to the OS before DataLoader workers fork from this process:
    glibc keeps freed heap pages otherwise, and every worker would map them (measured in benchmarks/scale.py)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def _check_records(recipe: Recipe, source, tokenizer, template, layout, out: Path):
    """Read, decode and tokenize every record once: (kept records, their lengths, rejects)."""
    import os

    from .datacache import CACHE_DIR, ImageVerdicts

    d = recipe.data
    rejects: list[Reject] = []
    try:
        records = read_records(
            source, d.image_folder, skip_bad=d.skip_bad, rejects=rejects, split=d.split,
            image_column=d.image_column, messages_column=d.messages_column,
        )
    except UserError:
        _write_rejects_once(rejects, out)  # "no usable records ... see rejects.jsonl": make it exist
        raise
    if d.verify_images:
        # threads on every core this process's share of the machine has: PIL decodes without holding the GIL
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))  # processes sharing this machine
        records = verify_images(records, rejects, d.skip_bad, workers=max(2, cores // max(1, per_node)),
                                verdicts=ImageVerdicts(out / CACHE_DIR / "images.json"))
    lengths, bad = shared_lengths(records, template, tokenizer, layout)
    if bad:
        first = min(bad)
        if not d.skip_bad:
            raise UserError(f"{records[first].where}: {bad[first]} (or pass --skip-bad to set such records aside)")
        rejects += [Reject(records[i].source, records[i].line, records[i].id, bad[i]) for i in sorted(bad)]
        keep = [i for i in range(len(records)) if i not in bad]
        records, lengths = [records[i] for i in keep], lengths[keep]
    if rejects:
        log.warning("%d record(s) set aside, listed in %s", len(rejects), _write_rejects_once(rejects, out))
    if not records:
        raise UserError(f"{source}: every record was rejected; see {out / 'rejects.jsonl'}")
    return records, lengths, rejects


COMPLETE = ".qilin-complete"  # written into a checkpoint once everything in it is on disk


class Stopped(Exception):
    """Training stopped on SIGTERM after writing a checkpoint; `--resume` continues it (not an error: exit 0)."""


def _callbacks():
    from transformers import TrainerCallback

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
            requested = self.requested
            if world_size() > 1:  # every process must stop at the same step, or the collective save hangs
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():
                    flag = torch.tensor([1.0 if requested else 0.0])
                    if dist.get_backend() == "nccl":
                        flag = flag.cuda()
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    requested = bool(flag.item())
            if requested:
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

    return Preemption()


def _trainer_class():
    from trl import SFTTrainer

    class QilinTrainer(SFTTrainer):
        """SFTTrainer with two small hooks: length grouping from precomputed lengths (the stock sampler would
        load every image to measure it), and align checkpoints that hold the projector, not a copy of the LLM."""

        sample_lengths = None  # set by run_stage: enables length grouping
        align_only = False
        loss_average = "tokens"  # "batch": each micro-batch's own mean, as the authors' transformers 4.31 Trainer
        projector_lr = None

        def create_optimizer(self, model=None):
            # the projector at its own rate beside the LLM (LLaVA-1.5's mm_projector_lr); decay rules as the Trainer's
            if self.projector_lr is None or self.optimizer is not None:
                return super().create_optimizer(model)
            from transformers import Trainer

            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict[tuple[bool, bool], list] = {}
            for name, p in opt_model.named_parameters():
                if p.requires_grad:
                    groups.setdefault(("multi_modal_projector" in name, name in decay), []).append(p)
            param_groups = [
                {"params": ps, "weight_decay": self.args.weight_decay if dec else 0.0,
                 **({"lr": self.projector_lr} if proj else {})}
                for (proj, dec), ps in sorted(groups.items())
            ]
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = cls(param_groups, **kwargs)
            return self.optimizer

        def _get_train_sampler(self, train_dataset=None):
            if self.sample_lengths is not None:
                batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                return EpochGroupedSampler(batch, [int(x) for x in self.sample_lengths], seed)
            # the random order is accelerate's SeedableRandomSampler: also a function of seed and epoch alone
            return super()._get_train_sampler(train_dataset)

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            from accelerate.state import PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            # accelerate turns FSDP on only for accelerator devices: with CPU processes it silently wraps the model
            # in DDP instead, every process holding everything. torch's FSDP2 itself shards over gloo, so the state
            # is put into FSDP mode here; on GPUs accelerate does this itself and this branch never runs.
            state = self.accelerator.state
            if self.args.fsdp_plugin_args is not None and state.distributed_type == DistributedType.MULTI_CPU:
                # both shared states, as accelerate does: a later AcceleratorState() copies the partial one over
                state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
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
            from transformers import Trainer

            return Trainer.compute_loss(self, model, {**inputs, "use_cache": False}, return_outputs, num_items_in_batch)

        # The loss without what only the log reads. trl's compute_loss also computes each token's entropy and top-1
        # hit in its fused LM head and gathers them (and the token count) across processes with host syncs, on
        # every micro-batch: 128 times per optimizer step in the QLoRA recipe (batch 1, 128 accumulated). Here only
        # the last micro-batch of a step that writes a log goes through trl's own path, so a log's entropy and
        # accuracy are that micro-batch's; the others go through a fused head that computes the log-probabilities
        # alone, giving the same loss to the bit. The token count is summed locally and gathered when a log is due.
        _lean_now = None  # set by lean_metrics(): a one-item list, True while a lean micro-batch runs
        _pending_tokens = None  # real tokens seen by lean steps, added to trl's count when a log is written

        def lean_metrics(self) -> None:
            """Install one forward that runs trl's fused head with or without the metric outputs. It is installed
            before accelerate prepares the model, so accelerate's autocast wrapper still wraps it."""
            import functools
            import types

            from trl.trainer.utils import add_fused_lm_head

            if self.compute_loss_func is not None or self.label_smoother is not None or self.aux_loss_enabled \
                    or self.args.loss_type != "nll":
                return  # paths where trl needs the logits or extra outputs: keep its own compute_loss throughout
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            full = base.forward  # trl's: log-probabilities, entropy, top-1
            add_fused_lm_head(base, outputs=("log_probs",))
            lean, flag = base.forward, [False]

            @functools.wraps(type(base).forward)  # generate() checks its kwargs against this signature
            def forward(_self, *args, **kwargs):
                return (lean if flag[0] else full)(*args, **kwargs)

            base.forward = types.MethodType(forward, base)
            self._lean_now = flag

        def _logs_now(self) -> bool:
            """Will the optimizer step this micro-batch belongs to write a log? (The Trainer's own rule.)"""
            from transformers.trainer_utils import IntervalStrategy

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

        # Host work the Trainer repeats on every micro-batch although its answer does not change. Measured on the
        # paper's 13B model with LoRA (3,636 modules; benchmarks/host_cost.py): `model.train()` walks every module
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
            if skip:
                real = type(model).train
                model.train = lambda mode=True: model if mode else real(model, mode)
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                if skip:
                    del model.train
            if self._nan_filter:  # the Trainer's filter: a NaN/inf loss counts as the mean since the last log
                fallback = self._tr_loss / (1 + self.state.global_step - self._globalstep_last_logged)
                loss = torch.where(torch.isfinite(loss), loss, fallback)
            return loss

        def floating_point_ops(self, inputs):
            key = getattr(self.model, "main_input_name", "input_ids")
            if self._flops_per_token is None:  # the parameter count does not change while training
                self._flops_per_token = super().floating_point_ops({key: torch.empty(1)})
            return self._flops_per_token * inputs[key].numel() if key in inputs else 0

        def log(self, logs, start_time=None):
            if self._pending_tokens is not None and self.model.training:
                total = self.accelerator.gather_for_metrics(self._pending_tokens).sum().item()
                self._total_train_tokens += total // self._tp_size
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
                self._pending_tokens = None
            return super().log(logs, start_time)

        def _save(self, output_dir=None, state_dict=None):
            if not self.align_only:
                return super()._save(output_dir, state_dict)
            if not self.args.should_save:
                return
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            if state_dict is None:  # unsharded: read the projector from the model
                save_projector(self.accelerator.unwrap_model(self.model), Path(output_dir) / PROJECTOR_FILE)
            else:  # FSDP / ZeRO-3: the trainer gathered the full state dict on every process for this call
                save_projector_state(projector_from_state_dict(state_dict), Path(output_dir) / PROJECTOR_FILE)

        def _save_optimizer_and_scheduler(self, output_dir):
            if not (self.align_only and self.is_fsdp_enabled):
                return super()._save_optimizer_and_scheduler(output_dir)
            # under FSDP the trainer would also write the whole frozen model (pytorch_model_fsdp.bin, 26 GB at 13B)
            # into every align checkpoint; the projector is already there, so that one write is skipped
            import transformers.trainer as hf_trainer

            real = hf_trainer.save_fsdp_model
            hf_trainer.save_fsdp_model = lambda *args, **kwargs: None
            try:
                return super()._save_optimizer_and_scheduler(output_dir)
            finally:
                hf_trainer.save_fsdp_model = real

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            if not self.align_only:
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            load_projector(model or self.model, Path(resume_from_checkpoint) / PROJECTOR_FILE)

    return QilinTrainer


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


def run_stage(recipe: Recipe, *, resume: bool = False) -> Path:
    """Train one stage as the recipe says; return the output directory."""
    return train_stage(recipe, resume=resume)[0]


def train_stage(recipe: Recipe, *, resume: bool = False):
    """Train one stage; return (output directory, the trained model as it is in memory)."""
    recipe.check()
    report_targets(recipe.train.report_to)  # a missing tracker fails now, not after minutes of data checks
    _check_deepspeed(recipe.train.deepspeed)  # so does a DeepSpeed config without DeepSpeed
    out = Path(recipe.output_dir)
    t0 = time.time()
    if out.exists() and any(out.glob("checkpoint-*")) and not resume:
        raise UserError(f"{out}: holds checkpoints of an earlier run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, out / "recipe.yaml")
    tr, m = recipe.train, recipe.model

    base, projector = resolve_base_for(recipe, out)
    bits = 4 if tr.mode == "qlora" or (recipe.stage == "align" and m.load_4bit) else None
    model = load_llava(base, bits=bits, dtype=m.dtype, attn=m.attn, trust_remote_code=m.trust_remote_code,
                       allow_pickle=m.allow_pickle)
    # No KV cache in training: it is useless there, conflicts with checkpointing, and with a cache transformers
    # skips the packed-sequence detection, so packed samples would silently attend to each other.
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    tokenizer, image_processor = load_tokenizer_and_processor(base)
    if projector is not None:
        load_projector(model, projector)
    # LoRA's A matrices are drawn here, before the Trainer seeds anything: seed now, so a run is reproducible and
    # every process draws the same adapter (FSDP keeps each process's own shard as it finds it, unsynchronised)
    from transformers import set_seed

    set_seed(tr.seed)
    lora = LoraSettings(tr.lora_r, tr.lora_alpha, tr.lora_dropout)
    model = configure(model, tr.mode, lora, gradient_checkpointing=tr.gradient_checkpointing)
    if not tr.deepspeed:
        trainable_to_fp32(model)
    log.info(trainable_summary(model))

    dataset, n_rejected = build_dataset(recipe, tokenizer, image_processor, model.config, out)
    n_samples = len(dataset)
    # eval rows are never packed: each sample's loss counts as it would alone
    eval_set = (build_dataset(recipe, tokenizer, image_processor, model.config, out, source=recipe.data.eval)[0]
                if recipe.data.eval else None)
    packing = None
    if recipe.data.packing and recipe.data.packing_row_length:
        dataset = PackedDataset(dataset, recipe.data.packing_row_length)
        log.info("packed %d samples into %d rows of at most %d tokens (data.packing_row_length)", n_samples,
                 len(dataset), recipe.data.packing_row_length)
    elif recipe.data.packing:
        packing = choose_packing(dataset.lengths, tr.per_device_batch, recipe.data.max_length,
                                 model.config._attn_implementation or "sdpa", model.config.get_text_config(),
                                 seed=tr.seed, grouped=recipe.data.group_by_length,
                                 accumulation=tr.grad_accum(world_size()))
        (log.info if packing.row_length == recipe.data.max_length else log.warning)("--packing: %s", packing.reason)
        if packing.row_length is not None:
            dataset = PackedDataset(dataset, packing.row_length)
            log.info("packed %d samples into %d rows of at most %d tokens", n_samples, len(dataset),
                     packing.row_length)
    args = sft_config(recipe, out, wrap=fsdp_units(model) if tr.fsdp else None)
    Trainer = _trainer_class()
    # transformers refuses to train a quantized model that has no peft adapter, to stop runs in which nothing can
    # learn. align with a 4-bit LLM trains the full-precision projector, so that guard does not apply: it is told
    # the model carries its own trainable part for the duration of the constructor only.
    quantized_align = bits is not None and tr.mode == "align"
    if quantized_align:
        assert any(p.requires_grad for p in model.parameters())
        model._hf_peft_config_loaded = True
    try:
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=as_hf_dataset(dataset),
            eval_dataset=as_hf_dataset(eval_set) if eval_set is not None else None,
            data_collator=Collator(tokenizer.pad_token_id),
            processing_class=tokenizer,
        )
    finally:
        if quantized_align:
            model._hf_peft_config_loaded = False
    if trainer.is_fsdp_enabled and bits:  # FSDP from an accelerate config, where recipe.check() cannot see it
        raise UserError("FSDP does not shard 4-bit weights here; launch QLoRA / --load-4bit without FSDP")
    if not tr.deepspeed:
        # again: trl casts every trainable parameter of a quantized model to bf16 in its constructor
        trainable_to_fp32(trainer.model)
    trainer.sample_lengths = dataset.lengths if recipe.data.group_by_length else None
    trainer.align_only = tr.mode == "align"
    trainer.loss_average = tr.loss_average
    if tr.loss_average == "batch":
        trainer.loss_is_scaled_for_ga = False  # the Trainer then divides each micro-batch's mean by the accumulation
    trainer.projector_lr = tr.projector_lr if tr.mode != "align" else None
    if tr.lean_metrics:
        trainer.lean_metrics()
    preemption = _callbacks()
    trainer.add_callback(preemption)
    start = last_checkpoint(out) if resume else None
    if resume and start is None:
        log.warning("--resume: %s has no checkpoint yet; training from the start", out)
    trainer.train(resume_from_checkpoint=start)
    if preemption.stopped_at is not None:
        raise Stopped(f"stopped by SIGTERM after step {preemption.stopped_at}; checkpoint-{preemption.stopped_at} "
                      f"is saved in {out}; run the same command with --resume to continue")

    sharded = sharded_fraction(trainer.model) if trainer.is_fsdp_enabled else None
    if sharded is not None:
        log.info("FSDP held %.0f%% of the parameters sharded across %d processes", 100 * sharded, world_size())
    save_outputs(trainer, recipe, out, base, tokenizer, image_processor)
    if trainer.args.should_save:  # one writer when several processes train
        history = trainer.state.log_history
        (out / "log_history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
        write_loss_curve(history, out / "loss.png", title=f"{recipe.stage} ({tr.mode})")
        summary = {
            "stage": recipe.stage, "mode": tr.mode, "samples": n_samples, "rows": len(dataset),
            "rejected": n_rejected, "steps": trainer.state.global_step, "seconds": round(time.time() - t0, 1),
            "processes": world_size(),
            "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        }
        evals = [h["eval_loss"] for h in history if "eval_loss" in h]
        if evals:
            summary["eval_samples"], summary["final_eval_loss"] = len(eval_set), evals[-1]
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
    return out, trainer.model


def sft_config(recipe: Recipe, out: Path, wrap: list[str] | None = None):
    from trl import SFTConfig

    tr = recipe.train
    cuda = torch.cuda.is_available()
    report = report_targets(tr.report_to)
    return SFTConfig(
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
        deepspeed=_deepspeed_path(tr.deepspeed),
        **_fsdp_args(tr, wrap),
        report_to=report,
        dataloader_num_workers=recipe.data.num_workers,
        remove_unused_columns=False,  # our collator needs every field; nothing unused reaches it
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenized and truncated by processing.py
        max_length=None,
        use_cpu=not cuda,
    )


def fsdp_units(model) -> list[str]:
    """Layer classes FSDP wraps one by one: the model's no-split blocks that it really contains (Llava lists
    CLIP text classes too, which accelerate would fail to find)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in names})


def report_targets(setting: str) -> list[str] | str:
    """train.report_to -> the Trainer's report_to, checked here so a missing tracker is one line, not a traceback
    at the first logging step."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

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


def _fsdp_args(tr, wrap: list[str] | None) -> dict:
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


def _check_deepspeed(name: str | None) -> None:
    """A recipe naming DeepSpeed where it is not installed: one line with both ways out."""
    import importlib.util

    _deepspeed_path(name)
    if name and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"train.deepspeed names {name} but DeepSpeed is not installed; pip install deepspeed "
                        "(multi-GPU), or train without it: --set train.deepspeed=none")


def _deepspeed_path(name: str | None) -> str | None:
    """Recipes name DeepSpeed files relative to the repository; accept that from any working directory."""
    if not name:
        return None
    from .config import REPO_RECIPES

    for p in (Path(name), REPO_RECIPES.parent / name):
        if p.is_file():
            return str(p)
    raise UserError(f"{name}: DeepSpeed config not found; give a path that exists (shipped: recipes/deepspeed/)")


def save_outputs(trainer, recipe: Recipe, out: Path, base: str, tokenizer, image_processor) -> None:
    """Weights through the trainer (it gathers FSDP / ZeRO-3 shards on every process and writes on the main one),
    then the files later commands read, from the main process only."""
    mode = recipe.train.mode
    # align: the trainer's _save writes the projector only; lora/qlora: a peft adapter that also holds the trained
    # projector (modules_to_save); full: a complete Llava directory
    trainer.save_model(str(out))
    if not trainer.args.should_save:
        return
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; recipe.yaml already records every setting
    kind = "full" if mode == "full" else mode
    RunInfo(kind, None if mode == "full" else _portable(base, out), recipe.template, recipe.image_mode).save(out)
    model = trainer.accelerator.unwrap_model(trainer.model)
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
