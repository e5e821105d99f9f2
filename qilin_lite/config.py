"""Recipes: YAML files -> checked dataclasses, with `section.key=value` overrides from the command line.

A recipe has three sections (`model`, `data`, `train`) plus `stage`, `output_dir` and `reproduces`. Unknown keys
are an error naming the file and the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .device import ATTENTION, DTYPES
from .errors import UserError
from .families import TEMPLATES
from .rules import ANY_TEXT, COUNT_MAX, FLAG, PATH, TEXT, Rule, check_fields, choice, kind_of, number, setting, shown
from .train.stages import MODES, llm_bits


def _recipes_dir() -> Path:
    """The recipes shipped inside an installed package (qilin_lite/recipes), else the clone's top-level recipes/."""
    here = Path(__file__).resolve().parent
    shipped = here / "recipes"
    return shipped if shipped.is_dir() else here.parent / "recipes"


REPO_RECIPES = _recipes_dir()


def _optimizers() -> list[str]:
    from .train.private_api import optimizer_names

    return optimizer_names()


# schedulers that need settings a recipe has no field for: lr_scheduler_kwargs (min_lr, num_decay_steps) or an
# eval metric to follow; transformers refuses them at the first step, so they are refused here before any work
_SCHEDULERS_NEEDING_MORE = {"cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
                            "reduce_lr_on_plateau", "greedy"}


def _schedulers() -> list[str]:
    from transformers import SchedulerType

    return [s.value for s in SchedulerType if s.value not in _SCHEDULERS_NEEDING_MORE]


LENGTH_MAX = 2**20  # tokens per sample or row: beyond any model's context here, and what buffers can be sized to
whole = number  # ints use the same bounds; the annotation decides the type


@dataclass
class ModelSection:
    base: str | None = setting(None, PATH)  # an existing Llava directory or hub id; when unset, vision + llm are joined
    vision: str = setting("openai/clip-vit-large-patch14-336", PATH)
    llm: str = setting("FlagAlpha/Llama2-Chinese-13b-Chat", PATH)
    projector: str = setting("mlp2x_gelu", choice(("mlp2x_gelu", "linear")))  # released weights; linear: the paper's text
    # torch: nn.Linear's own init (the authors'); normal: N(0, 0.02), zero bias
    projector_init: str = setting("torch", choice(("torch", "normal")))
    # which hidden state of the tower feeds the projector; assemble_base checks it against the tower's layer count
    vision_feature_layer: int = setting(-2, whole(-LENGTH_MAX, LENGTH_MAX))
    from_run: str | None = setting(None, PATH)  # tune: the align output directory whose projector to start from
    dtype: str = setting("bfloat16", choice(DTYPES))
    attn: str = setting("auto", choice(ATTENTION))  # auto | flash_attention_2 | sdpa | eager
    load_4bit: bool = setting(False, FLAG)  # align only: frozen LLM in 4-bit NF4 so stage 1 fits small GPUs
    trust_remote_code: bool = setting(False, FLAG)
    allow_pickle: bool = setting(False, FLAG)

    def __post_init__(self):
        check_fields(self, "model.")


@dataclass
class DataSection:
    train: str | None = setting(None, PATH)  # LLaVA JSON/JSONL file, or a Hugging Face dataset name/path
    eval: str | None = setting(None, PATH)  # held-out file in the same format (same image folder): eval loss while training
    # a benchmark in any layout eval reads, as [TASK:]FILE (a bare FILE: the llava layout): answered and scored every
    # train.eval_every steps (train/task_eval.py); its images relative to eval_task_images (default: image_folder for
    # the llava layout, else the file's folder)
    eval_task: str | None = setting(None, PATH)
    eval_task_images: str | None = setting(None, PATH)
    image_folder: str | None = setting(None, PATH)
    template: str | None = setting(None, choice(lambda: TEMPLATES))  # default: plain (align), vicuna_v1 (tune)
    image_mode: str | None = setting(None, choice(("pad", "crop")))  # default: crop (align), pad (tune), as the paper's scripts
    # native-resolution models (Qwen2.5-VL): each image resized to between these many pixels, as the Qwen processors'
    # min_pixels / max_pixels (28 x 28 pixels a token); unset: the model's own preprocessor_config.json
    min_pixels: int | None = setting(None, whole(28 * 28, COUNT_MAX, why="one 28 x 28 patch group at least"))
    max_pixels: int | None = setting(None, whole(28 * 28, COUNT_MAX, why="one 28 x 28 patch group at least"))
    max_length: int = setting(2048, whole(16, LENGTH_MAX, why="16 holds an image and a reply"))
    # text: max_length counts text ids, an image as one (the authors' cut; sequences reach max_length + 575 at 336 px)
    # total: every position counts, image tokens included (a hard cap on memory)
    length_mode: str = setting("text", choice(("text", "total")))
    group_by_length: bool = setting(True, FLAG)  # batches of similar length: less padding
    packing: bool = setting(False, FLAG)  # several samples per row, no padding between them (batch counts rows, not samples)
    # rows of this many tokens, as given; unset: the row length with the least estimated work, and no packing when
    # none saves enough over unpacked batches (3%, 20% on the CPU: packing.py)
    packing_row_length: int | None = setting(None, whole(16, LENGTH_MAX, why="one sample; unset: --packing chooses"))
    skip_bad: bool = setting(False, FLAG)  # set bad records aside in rejects.jsonl instead of stopping
    allow_outside_images: bool = setting(False, FLAG)  # image names may lead outside image_folder (absolute paths on purpose)
    verify_images: bool = setting(True, FLAG)  # decode every image once before training
    num_workers: int = setting(2, whole(0, 256, why="0 loads in the main process"))
    split: str = setting("train", TEXT)
    image_column: str = setting("image", TEXT)
    messages_column: str | None = setting(None, TEXT)

    def __post_init__(self):
        check_fields(self, "data.")


@dataclass
class TrainSection:
    mode: str = setting("align", choice(MODES))  # align | lora | qlora | full
    # the batch the recipe reproduces; accumulation is derived from it
    global_batch: int = setting(256, whole(1, LENGTH_MAX))
    per_device_batch: int = setting(32, whole(1, LENGTH_MAX))
    lr: float = setting(1e-3, number(0, lo_open=True))
    # lora/qlora/full: the projector's own rate (LLaVA-1.5's mm_projector_lr); none: the same as train.lr
    projector_lr: float | None = setting(None, number(0, lo_open=True))
    optim: str = setting("adamw_torch_fused", choice(_optimizers))  # the authors': adamw_torch (same maths, unfused kernels)
    max_grad_norm: float = setting(1.0, number(0, why="0: no clipping"))  # the authors' DeepSpeed configs set none
    loss_average: str = setting("tokens", choice(("tokens", "batch")))  # tokens: mean over every supervised token of
    # the step (all GPUs, accumulation); batch: mean over each micro-batch's tokens, then averaged over GPUs and
    # accumulation (the authors')
    lean_metrics: bool = setting(True, FLAG)  # token entropy / accuracy computed on the steps that log, not on every step
    epochs: float = setting(1.0, number(0, 10_000, lo_open=True, why="passes over the data"))
    max_steps: int = setting(-1, Rule(f"-1 (train for train.epochs) or 1 to {COUNT_MAX}",
                                      lambda v: v == -1 or 1 <= v <= COUNT_MAX))  # > 0 stops early (smoke runs)
    warmup_ratio: float = setting(0.03, number(0, 1, hi_open=True))
    weight_decay: float = setting(0.0, number(0))  # and below 1 / lr: see __post_init__
    scheduler: str = setting("cosine", choice(_schedulers))
    bf16: bool = setting(True, FLAG)
    tf32: bool = setting(True, FLAG)
    gradient_checkpointing: bool = setting(True, FLAG)
    reentrant_checkpointing: bool = setting(False, FLAG)  # torch's reentrant checkpoint, as the authors' transformers 4.31 used
    lora_r: int = setting(64, whole(1, 65536))  # higher: more capacity and memory
    lora_alpha: int = setting(16, whole(1, LENGTH_MAX))
    lora_dropout: float = setting(0.05, number(0, 1, hi_open=True))
    seed: int = setting(42, whole(0, 2**32 - 1, why="what numpy can be seeded with"))
    logging_steps: int = setting(1, whole(1, COUNT_MAX))
    save_steps: int = setting(500, whole(1, COUNT_MAX))
    eval_steps: int = setting(0, whole(0, COUNT_MAX, why="0: at the end of each epoch"))  # with data.eval
    save_total_limit: int = setting(2, whole(0, COUNT_MAX, why="0 keeps every checkpoint"))
    eval_every: int = setting(0, whole(0, COUNT_MAX, why="0: after the last step only"))  # with data.eval_task
    eval_task_metric: str = setting("auto", choice(("auto", "accuracy", "closed_strict", "closed_llavamed",
                                                    "short_accuracy", "open_recall", "rougeL")))
    keep_best: bool = setting(False, FLAG)  # the finished run holds the weights of the best data.eval_task score
    # prefer (DPO) and reinforce (GRPO): how far the policy may move from the reference (none: 0.1 for DPO, trl's
    # default; 0.04 for GRPO, the open-r1-multimodal scripts' KL weight); trl's DPOConfig.loss_type (a comma list
    # mixes several, equally weighted); the projector trains in tune and stays frozen after it unless "train"
    beta: float | None = setting(None, number(0))
    dpo_loss: str = setting("sigmoid", TEXT)
    projector: str = setting("auto", choice(("auto", "train", "freeze")))
    # reinforce (GRPO): completions sampled per question and their sampling temperature (8 and 1.0, as the medical
    # R1 runs and open-r1-multimodal), their length limit, how the loss averages over tokens (grpo: per completion,
    # then over completions, as those runs; dapo: over every token; dr_grpo: over G x max length), how rewards are
    # scaled (group: by each question's standard deviation), and the reasoning layout with its format reward
    num_generations: int = setting(8, whole(2, 1024))
    temperature: float = setting(1.0, number(0, 10, lo_open=True))
    max_completion_length: int = setting(256, whole(1, LENGTH_MAX))
    grpo_loss: str = setting("grpo", choice(("grpo", "dapo", "dr_grpo")))
    scale_rewards: str = setting("group", choice(("group", "batch", "none")))
    reasoning: bool = setting(False, FLAG)  # ask for <think>...</think><answer>...</answer>; score the answer part
    format_weight: float = setting(1.0, number(0))  # with reasoning: the format reward's weight beside correctness
    # auto: TensorBoard when installed; none; or wandb, swanlab, tensorboard, ... (comma list; args.report_targets)
    report_to: str = setting("auto", TEXT)
    deepspeed: str | None = setting(None, PATH)  # a DeepSpeed JSON (paper: ZeRO-2 for align, ZeRO-3 for tune)
    # instead of DeepSpeed: full_shard (like ZeRO-3) | shard_grad_op (like ZeRO-2), "+ offload"
    fsdp: str | None = setting(None, TEXT)

    def __post_init__(self):
        check_fields(self, "train.")
        # AdamW (and SGD's L2 decay) shrink each weight by lr x weight_decay per step: at 1 or more every weight is
        # zeroed or flips sign each step, which no recipe means
        for name, lr in (("lr", self.lr), ("projector_lr", self.projector_lr)):
            if lr is not None and lr * self.weight_decay >= 1:
                raise UserError(f"train.weight_decay {self.weight_decay} x train.{name} {lr} must stay below 1 (each "
                                f"step shrinks every weight by that fraction); lower train.weight_decay")
        self.fsdp_options  # noqa: B018 (raises on a bad value)

    @property
    def fsdp_options(self) -> tuple[bool, bool] | None:
        """(reshard after forward, offload to CPU) from `fsdp`, or None when FSDP is off."""
        if not self.fsdp:
            return None
        words = set(self.fsdp.replace("+", " ").replace(",", " ").split())
        strategies = words & {"full_shard", "shard_grad_op"}
        if len(strategies) != 1 or words - {"full_shard", "shard_grad_op", "offload"}:
            raise UserError(f"train.fsdp must be full_shard or shard_grad_op, optionally with offload, not '{self.fsdp}'")
        return "full_shard" in strategies, "offload" in words

    def grad_accum(self, world_size: int) -> int:
        """Accumulation that keeps the global batch (and so the learning rate) the recipe's on any GPU count."""
        per_step = self.per_device_batch * world_size
        if self.global_batch % per_step:
            raise UserError(
                f"global batch {self.global_batch} is not a multiple of per-device batch {self.per_device_batch} x "
                f"{world_size} process(es); change train.per_device_batch or train.global_batch"
            )
        return self.global_batch // per_step


@dataclass
class Recipe:
    stage: str = setting("align", choice(("align", "tune", "prefer", "reinforce")))
    output_dir: str | None = setting(None, PATH)
    reproduces: str = setting("", ANY_TEXT)  # what the recipe reproduces, e.g. "paper stage 1: global batch 256, lr 1e-3"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self):
        check_fields(self)

    @property
    def template(self) -> str:
        return self.data.template or ("plain" if self.stage == "align" else "vicuna_v1")

    @property
    def image_mode(self) -> str:
        return self.data.image_mode or ("crop" if self.stage == "align" else "pad")

    @property
    def llm_bits(self) -> int | None:
        """4 when the LLM is loaded in NF4 (qlora, or align with model.load_4bit), else None."""
        return llm_bits(self.train.mode, self.model.load_4bit)

    @property
    def dpo_losses(self) -> list[str]:
        """train.dpo_loss as trl's DPOConfig.loss_type list, checked against the types the installed trl offers."""
        import dataclasses as dc
        import re

        from trl import DPOConfig

        # the installed trl's own list, from the field's help ("Possible values are: `'sigmoid'`, ...")
        field_ = next((f for f in dc.fields(DPOConfig) if f.name == "loss_type"), None)
        text = field_.metadata.get("help", "") if field_ is not None else ""
        offered = re.findall(r"`'([a-z_]+)'`", text.split("If multiple")[0])
        wanted = [w.strip() for w in self.train.dpo_loss.split(",") if w.strip()]
        bad = [w for w in wanted if offered and w not in offered]
        if not wanted or bad:
            raise UserError(f"train.dpo_loss '{self.train.dpo_loss}': choose from {', '.join(offered) or 'sigmoid'} "
                            "(a comma list mixes several)")
        return wanted

    @property
    def beta(self) -> float:
        """train.beta, or the stage's default (DPO 0.1, GRPO 0.04)."""
        if self.train.beta is not None:
            return self.train.beta
        return 0.04 if self.stage == "reinforce" else 0.1

    @property
    def projector_trains(self) -> bool:
        """Whether the projector learns beside the LoRA / full LLM: tune yes, prefer no, unless train.projector says."""
        return self.train.projector == "train" or (self.train.projector == "auto" and self.stage == "tune")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> "Recipe":
        """Every field again (code may have changed one since construction), the cross-field rules, and the DeepSpeed
        file: checked once every override is in, before any work."""
        for section, prefix in ((self, ""), (self.model, "model."), (self.data, "data."), (self.train, "train.")):
            check_fields(section, prefix)
        if self.stage == "align" and self.train.mode != "align":
            raise UserError(f"stage align trains the projector only; train.mode must be align, not '{self.train.mode}'")
        if self.stage in ("tune", "prefer") and self.train.mode == "align":
            raise UserError(f"stage {self.stage} needs a mode: pass --lora, --qlora or --full")
        if self.stage in ("prefer", "reinforce"):
            if not (self.model.from_run or self.model.base):
                raise UserError(f"{self.stage} starts from a trained model: pass --from RUN (a tune, merged, full or "
                                "converted run, or a released model)")
        if self.stage == "prefer":
            if self.train.beta == 0:
                raise UserError("train.beta must be above 0 for DPO (it scales the preference margin); try 0.1")
            self.dpo_losses  # noqa: B018 (raises on a bad value)
        if self.train.eval_every and not self.data.eval_task:  # else it would be silently ignored
            raise UserError(f"--eval-every {self.train.eval_every} scores a benchmark while training, and none is "
                            "named: add --eval-task FILE (any benchmark layout eval reads), or drop the flag")
        if self.model.load_4bit and self.stage != "align":
            raise UserError("model.load_4bit is for align; for tuning use --qlora")
        if self.train.fsdp:
            if self.train.deepspeed:
                raise UserError("train.fsdp and train.deepspeed both set; pick one way to shard the model")
            if self.llm_bits:
                raise UserError("train.fsdp does not shard 4-bit weights here; QLoRA fits one GPU (drop train.fsdp) "
                                "or use --lora / --full with FSDP")
        if not self.data.train:
            raise UserError("no training data: pass --data FILE (LLaVA JSON/JSONL) or set data.train in the recipe")
        if not self.output_dir:
            raise UserError("no output directory: pass --out DIR")
        deepspeed_path(self.train.deepspeed)
        return self


# keys of DeepSpeed's own config (deepspeed/runtime/constants.py); a JSON file with none of them is something else
_DEEPSPEED_KEYS = {"zero_optimization", "train_batch_size", "train_micro_batch_size_per_gpu",
                   "gradient_accumulation_steps", "fp16", "bf16", "optimizer", "scheduler", "gradient_clipping",
                   "steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer", "activation_checkpointing"}


def deepspeed_path(name: str | None) -> str | None:
    """The DeepSpeed JSON a recipe names (None: no DeepSpeed), checked to be one. Recipes name shipped files
    relative to the repository (`recipes/deepspeed/zero3.json`); that works from any working directory and in an
    installed package, where recipes/ ships as qilin_lite/recipes."""
    if not name:
        return None
    found = next((p for p in (Path(name), REPO_RECIPES.parent / name) if _is_file(p)), None)
    if found is None:
        raise UserError(f"{name}: DeepSpeed config not found; give a path that exists (shipped: recipes/deepspeed/)")
    fix = "name a DeepSpeed JSON config (shipped: recipes/deepspeed/zero2.json, zero3.json) or set train.deepspeed=none"
    try:
        with found.open("rb") as f:
            raw = f.read((1 << 20) + 1)  # a config is a few hundred bytes; never read a huge file whole
        config = json.loads(raw.decode("utf-8")) if len(raw) <= 1 << 20 else None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        config = None
    if not isinstance(config, dict) or not _DEEPSPEED_KEYS & set(config):
        raise UserError(f"{found}: not a DeepSpeed config (a JSON object with zero_optimization, "
                        f"train_batch_size, ...); {fix}")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise UserError(f"{found}: zero_optimization must be an object whose stage is 0, 1, 2 or 3; {fix}")
    return str(found)


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except (OSError, ValueError):  # a name the file system refuses to look up (too long once joined)
        return False


SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection}


def _build(cls, values: dict, source: str, prefix: str = ""):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(values) - set(names))
    if unknown:
        raise UserError(
            f"{source}: unknown key {shown(prefix + unknown[0])}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for k, v in values.items():
        if k in SECTIONS and cls is Recipe:
            v = {} if v is None else v  # `train:` with nothing under it
            if not isinstance(v, dict):
                raise UserError(f"{source}: '{k}' must be a mapping of settings")
            kwargs[k] = _build(SECTIONS[k], v, source, prefix=f"{k}.")
        else:
            kwargs[k] = _coerce(names[k], v, source, prefix + k)
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value: Any, source: str, key: str):
    """A YAML value -> the field's type (ranges are the field's rule, checked when the section is built)."""
    kind, optional = kind_of(f)
    if value is None:
        return None
    if optional and (value is False or (
            isinstance(value, str) and value.strip().lower() in ("none", "null", "off", "false", ""))):
        # an optional setting switched off (--set train.deepspeed=none, train.projector_lr=none); YAML reads a bare
        # `off` as false
        return None
    try:
        if isinstance(value, bool) != (kind == "bool") or not isinstance(value, (bool, int, float, str)):
            raise ValueError  # a mapping, a list, a date; yes/no for a number or text (quote text: 'yes')
        if kind == "int":
            if isinstance(value, str):
                value = value.strip()
                return int(value) if value.lstrip("+-").isdigit() else _whole(float(value))
            return value if isinstance(value, int) else _whole(value)
        if kind == "float":
            return float(value)
        if kind == "str":
            return str(value)
    except (TypeError, ValueError, OverflowError):
        if isinstance(value, str) and value.lstrip("+-").isdigit():  # past Python's 4,300-digit int() limit
            raise UserError(f"{source}: '{key}' is a {len(value)}-digit number, far outside its range") from None
        raise UserError(f"{source}: '{key}' must be {kind}, got {shown(value)}") from None
    return value


def _whole(x: float) -> int:
    if not x.is_integer():  # also NaN and inf
        raise ValueError
    return int(x)


def load_recipe(path: str | Path | None, overrides: list[str] | None = None, **fields_) -> Recipe:
    """YAML recipe (or defaults) + `section.key=value` overrides + explicit keyword fields -> checked Recipe."""
    data: dict = {}
    source = "recipe"
    if path:
        p = Path(path)
        if not p.exists() and (REPO_RECIPES / path).exists():
            p = REPO_RECIPES / path
        if not p.exists():
            raise UserError(f"{path}: recipe not found; see recipes/ for the shipped ones")
        source = str(p)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, ValueError, OSError, RecursionError) as e:  # ValueError: a number of 5,000 digits
            raise UserError(f"{p}: not a readable YAML recipe ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"{p}: a recipe must be a mapping of settings")
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like section.key=value, e.g. train.lr=2e-4")
        key, raw = item.split("=", 1)
        _set(data, key.strip(), _value(raw))
    for key, value in fields_.items():
        if value is not None:
            _set(data, key, value)
    return _build(Recipe, data, source)


def _value(raw: str):
    """An override's value as YAML reads it (2e-4, true, none); what YAML cannot read (`[`, a 5,000-digit number)
    stays the text it is, and the field's type then says whether text is allowed there."""
    if not raw.strip():
        return None
    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, RecursionError):
        return raw


def _set(data: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        if node.get(p) is None:  # absent, or `train:` with nothing under it
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise UserError(f"cannot set '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def save_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.to_dict(), allow_unicode=True, sort_keys=False), encoding="utf-8")
