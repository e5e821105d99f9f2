"""The one module that reaches past the public surface of trl, transformers and accelerate.

Written for (and tested with) trl 1.16, transformers 5.25 and accelerate 1.16: pyproject's floors. Everything else in
qilin_lite uses their public names only; tests/test_private_api.py scans the package to keep it so. A release that
drops or renames something listed here fails `check_versions()` with one line when the trainer is built, instead of
a traceback in the middle of a run. What each reach is for, and why no public hook does that job:

trl
- `trl.trainer.utils.add_fused_lm_head` (`fused_lm_head`): SFTTrainer installs it with every metric output; the lean
  micro-batches (trainer.py, `lean_metrics`) need a second forward with the log-probabilities alone. trl has no
  setting that picks the outputs. `FusedCausalLMOutput` (`fused_output`): the answer lm_head.py's plain head gives.
- `SFTTrainer._total_train_tokens`, `_tp_size`, `_metrics` (`add_train_tokens`): the lean micro-batches skip trl's
  compute_loss, so the tokens they saw are added to trl's count when a log is written; trl's log reads `_metrics`.

- `DPOTrainer._prepare_dataset` (`PreparedPairs`): DPOTrainer tokenizes every text dataset itself and has no
  setting to skip it (SFTConfig's `skip_prepare_dataset` has no DPO twin); prefer's pairs arrive encoded by the
  family's own template (prefer/pairs.py), so the hook returns them as they are.

transformers
- `Trainer._get_train_sampler`, `_save`, `_save_optimizer_and_scheduler`, `_load_from_checkpoint` (`TrainerHooks`):
  the only places to choose the training sampler (`get_train_dataloader` would have to be copied whole) and to make
  an align checkpoint hold the projector instead of the frozen LLM. The mixin defines them and hands each job to a
  public method of the trainer (`train_sampler`, `save_weights`, `save_training_state`, `load_weights`).
- `transformers.trainer.save_fsdp_model` (`no_fsdp_model_save`): `_save_optimizer_and_scheduler` writes the whole
  model beside the optimizer under FSDP; an align checkpoint skips that write (26 GB at 13B).
- `Trainer._tr_loss`, `_globalstep_last_logged` (`logged_loss_fallback`): the Trainer's NaN/inf filter reads the
  loss back to the host on every micro-batch; trainer.py applies the same filter on the device, with its fallback.
- `Trainer.training_step` calls `model.train()` first thing (`train_mode_kept`): a no-op walk of every module when
  all of them train already, made a no-op call for that step.
- `PretrainedConfig._attn_implementation` (`attention_of`, `set_attention`): `model.set_attn_implementation` is the
  public route but takes the whole model and re-checks every sub-model; packed training switches the language
  model's config alone, and back before saving.
- `PreTrainedModel._hf_peft_config_loaded` (`peft_loaded`): the Trainer refuses a quantized model without an adapter;
  align with a 4-bit LLM trains the full-precision projector, so the flag is set for the constructor only.
- `PreTrainedModel._no_split_modules` (`no_split_modules`): the layer classes FSDP wraps one by one.
- A model's `forward` replaced on the instance (`replace_forward`), as trl's own fused head does it.
- `transformers.core_model_loading.revert_weight_conversion` (`saved_names`): `save_pretrained` writes a
  checkpoint under the release's key names (`language_model.model.*` for Llava), while the Trainer's reload of a
  full checkpoint calls `load_state_dict(strict=False)` with them and so loads nothing. The function is the one
  save_pretrained applies; transformers exports no public name-mapping for a live model.

accelerate
- `PartialState._shared_state` (`mark_fsdp`): accelerate turns FSDP on for accelerator devices only; on CPU processes
  (tests, and gloo) the state is put into FSDP mode by hand, in both shared states as accelerate itself does.
"""

from __future__ import annotations

import contextlib
import functools
import types

from ..errors import UserError

# the ranges pyproject.toml declares (tests/test_private_api.py checks they agree)
SUPPORTED = {"trl": ">=1.16.0,<2", "transformers": ">=5.25.0,<6", "accelerate": ">=1.16.0"}

# the private hooks of transformers.Trainer that TrainerHooks defines
HOOKS = ("_get_train_sampler", "_save", "_save_optimizer_and_scheduler", "_load_from_checkpoint")


# ---------------------------------------------------------------- names
def optimizer_names() -> list[str]:
    """The optimizer names `TrainingArguments(optim=...)` accepts: transformers lists them in
    `training_args.OptimizerNames`, which its top level does not export."""
    from transformers.training_args import OptimizerNames

    return [o.value for o in OptimizerNames]


# ---------------------------------------------------------------- versions
def _installed(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(not installed)"


def _lacks(package: str, what: str) -> UserError:
    return UserError(f"{package} {_installed(package)} lacks {what}, which qilin-lite's trainer needs; supported: "
                     f"{package}{SUPPORTED[package]} (pip install '{package}{SUPPORTED[package]}')")


@functools.lru_cache(maxsize=None)  # a module's source does not change in a process; the check runs per trainer
def _source(module) -> str:
    import inspect

    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        return ""


def _needs() -> list[tuple[str, str, object]]:
    """(package, what, check): each check is a function returning True when the installed package has it."""
    import importlib

    def imports(module: str, *names: str):
        def check():
            try:
                m = importlib.import_module(module)
            except ImportError:
                return False
            return all(hasattr(m, n) for n in names)
        return check

    def sets(module: str, *attrs: str):  # an instance attribute the module's code keeps (set in __init__ or train)
        def check():
            try:
                text = _source(importlib.import_module(module))
            except ImportError:
                return False
            return all(f"self.{a}" in text for a in attrs)
        return check

    def trainer_has(*names: str):
        def check():
            from transformers import Trainer

            return all(callable(getattr(Trainer, n, None)) for n in names)
        return check

    def config_attention():
        from transformers import PretrainedConfig

        prop = getattr(PretrainedConfig, "_attn_implementation", None)
        return isinstance(prop, property) and prop.fset is not None

    def peft_flag():
        import transformers.trainer
        import transformers.trainer_utils

        return any("_hf_peft_config_loaded" in _source(m) for m in (transformers.trainer_utils, transformers.trainer))

    def no_split():
        from transformers import PreTrainedModel

        return hasattr(PreTrainedModel, "_no_split_modules")

    def dpo_prepare():
        from trl import DPOTrainer

        return callable(getattr(DPOTrainer, "_prepare_dataset", None))

    def shared_state():
        from accelerate import PartialState

        return hasattr(getattr(PartialState, "_shared_state", None), "__setitem__")

    return [
        ("trl", "trl.trainer.utils.add_fused_lm_head", imports("trl.trainer.utils", "add_fused_lm_head")),
        ("trl", "trl.trainer.utils.FusedCausalLMOutput", imports("trl.trainer.utils", "FusedCausalLMOutput")),
        ("trl", "DPOTrainer._prepare_dataset", dpo_prepare),
        ("trl", "SFTTrainer's _metrics / _total_train_tokens / _tp_size",
         sets("trl.trainer.sft_trainer", "_metrics", "_total_train_tokens", "_tp_size")),
        ("transformers", "Trainer." + " / ".join(HOOKS), trainer_has(*HOOKS)),
        ("transformers", "transformers.trainer.save_fsdp_model", imports("transformers.trainer", "save_fsdp_model")),
        ("transformers", "Trainer._tr_loss / _globalstep_last_logged",
         sets("transformers.trainer", "_tr_loss", "_globalstep_last_logged")),
        ("transformers", "PretrainedConfig._attn_implementation (a settable property)", config_attention),
        ("transformers", "the _hf_peft_config_loaded training guard", peft_flag),
        ("transformers", "PreTrainedModel._no_split_modules", no_split),
        ("transformers", "transformers.core_model_loading.revert_weight_conversion",
         imports("transformers.core_model_loading", "revert_weight_conversion")),
        ("accelerate", "PartialState._shared_state", shared_state),
    ]


def check_versions() -> None:
    """Raise a one-line UserError naming the package, its installed version and the supported range when trl,
    transformers or accelerate lack something this module reaches."""
    for package, what, check in _needs():
        try:
            ok = check()
        except Exception:  # noqa: BLE001 - a check that cannot even run means the thing is not there
            ok = False
        if not ok:
            raise _lacks(package, what)


# ---------------------------------------------------------------- trl
def fused_lm_head(model, outputs: tuple[str, ...]):
    """Install trl's fused LM head on `model` (its forward answers `fused_lm_head=True`) computing `outputs` (of
    "log_probs", "entropy", "is_top1"); returns the forward it installed."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=outputs)
    return model.forward


def fused_output(**fields):
    """trl's `FusedCausalLMOutput` (loss, log_probs, entropy, is_top1, label_mask)."""
    from trl.trainer.utils import FusedCausalLMOutput

    return FusedCausalLMOutput(**fields)


def add_train_tokens(trainer, seen: int) -> None:
    """Add `seen` tokens (gathered over every process) to trl's running count, as its compute_loss does, and put the
    count where its log reads it."""
    trainer._total_train_tokens += seen // trainer._tp_size
    trainer._metrics["train"]["num_tokens"] = [trainer._total_train_tokens]


class PreparedPairs:
    """A mixin before trl's DPOTrainer: the dataset it is given is already encoded (prefer/pairs.py)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


# ---------------------------------------------------------------- transformers
class TrainerHooks:
    """A mixin before a transformers Trainer in the bases: the Trainer's private hooks, each handing its job to a
    public method the subclass overrides (whose default is the Trainer's own)."""

    def train_sampler(self, train_dataset=None):
        """The sampler training draws from (the Trainer's own by default)."""
        return super()._get_train_sampler(train_dataset)

    def save_weights(self, output_dir=None, state_dict=None):
        """Write the weights of a checkpoint or of the final save (the Trainer's own by default)."""
        return super()._save(output_dir, state_dict)

    def save_training_state(self, output_dir, model_too: bool = True):
        """Write the optimizer and scheduler into a checkpoint (the Trainer's own by default). `model_too=False`
        skips the whole-model file the Trainer writes beside an FSDP optimizer."""
        if model_too:
            return super()._save_optimizer_and_scheduler(output_dir)
        with no_fsdp_model_save():
            return super()._save_optimizer_and_scheduler(output_dir)

    def load_weights(self, resume_from_checkpoint, model=None):
        """Load a checkpoint's weights on resume (the Trainer's own by default)."""
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _get_train_sampler(self, train_dataset=None):
        return self.train_sampler(train_dataset)

    def _save(self, output_dir=None, state_dict=None):
        return self.save_weights(output_dir, state_dict)

    def _save_optimizer_and_scheduler(self, output_dir):
        return self.save_training_state(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        return self.load_weights(resume_from_checkpoint, model)


@contextlib.contextmanager
def no_fsdp_model_save():
    """While inside: the Trainer's checkpoint writes no FSDP model file."""
    import transformers.trainer as hf_trainer

    real = hf_trainer.save_fsdp_model
    hf_trainer.save_fsdp_model = lambda *args, **kwargs: None
    try:
        yield
    finally:
        hf_trainer.save_fsdp_model = real


def logged_loss_fallback(trainer):
    """What the Trainer's NaN/inf filter counts a non-finite loss as: the mean loss since the last log."""
    return trainer._tr_loss / (1 + trainer.state.global_step - trainer._globalstep_last_logged)


@contextlib.contextmanager
def train_mode_kept(model):
    """While inside: `model.train()` (what Trainer.training_step calls first) returns at once; `train(False)` still
    switches to eval mode."""
    real = type(model).train
    model.train = lambda mode=True: model if mode else real(model, mode)
    try:
        yield
    finally:
        del model.train


def replace_forward(model, forward) -> None:
    """Give `model` (a transformers model) the forward `forward(self, *args, **kwargs)`, keeping its class forward's
    signature (generate() checks its kwargs against it)."""
    wrapped = functools.wraps(type(model).forward)(forward)
    model.forward = types.MethodType(wrapped, model)


def attention_of(config) -> str | None:
    """The attention implementation a (text) config runs."""
    return config._attn_implementation


def set_attention(config, implementation: str) -> None:
    """Set a config's attention implementation (and its sub-configs')."""
    config._attn_implementation = implementation


def peft_loaded(model, flag: bool) -> None:
    """Tell transformers' quantized-training guard that `model` carries its own trainable part (True), or not."""
    model._hf_peft_config_loaded = flag


def length_grouped_indices(lengths, group_size: int, generator):
    """transformers' length-grouped order (megabatches of `group_size`, longest first), which it does not export
    publicly: drawn from the generator alone, so the order is the Trainer's own for the same seed."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    return get_length_grouped_indices(lengths, group_size, generator=generator)


def no_split_modules(model) -> list[str]:
    """The layer class names a model says must not be split across devices (FSDP's units)."""
    return list(getattr(model, "_no_split_modules", None) or [])


def saved_names(model) -> dict[str, str]:
    """{a name in `model.state_dict()`: the name `save_pretrained` writes it under}. A placeholder tensor per name goes
    through the same reversal save_pretrained applies, so renames are followed by identity; a conversion that
    rebuilds tensors (fused experts) leaves its names unmapped and the caller refuses them."""
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    live = {k: torch.empty(0) for k in model.state_dict()}
    by_id = {id(v): k for k, v in live.items()}
    return {by_id[id(v)]: k for k, v in revert_weight_conversion(model, dict(live)).items() if id(v) in by_id}


# ---------------------------------------------------------------- accelerate
def mark_fsdp(state) -> None:
    """Put accelerate's state (and the process state a later AcceleratorState() copies over) into FSDP mode."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
