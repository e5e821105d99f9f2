"""Recipes: YAML files -> checked dataclasses, with `section.key=value` overrides from the command line.

A recipe has three sections (`model`, `data`, `train`) plus `stage`, `output_dir` and `reproduces`. Unknown keys
are an error naming the file and the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .train.stages import MODES, llm_bits


def _recipes_dir() -> Path:
    """The recipes shipped inside an installed package (qilin_lite/recipes), else the clone's top-level recipes/."""
    here = Path(__file__).resolve().parent
    shipped = here / "recipes"
    return shipped if shipped.is_dir() else here.parent / "recipes"


REPO_RECIPES = _recipes_dir()


@dataclass
class ModelSection:
    base: str | None = None  # an existing Llava directory or hub id; when unset, vision + llm are joined
    vision: str = "openai/clip-vit-large-patch14-336"
    llm: str = "FlagAlpha/Llama2-Chinese-13b-Chat"
    projector: str = "mlp2x_gelu"  # released weights; "linear" is the paper's text
    projector_init: str = "torch"  # torch: nn.Linear's own init (the authors'); normal: N(0, 0.02), zero bias
    vision_feature_layer: int = -2
    from_run: str | None = None  # tune: the align output directory whose projector to start from
    dtype: str = "bfloat16"
    attn: str = "auto"  # auto | flash_attention_2 | sdpa | eager
    load_4bit: bool = False  # align only: frozen LLM in 4-bit NF4 so stage 1 fits small GPUs
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def __post_init__(self):
        if self.projector not in ("mlp2x_gelu", "linear"):
            raise UserError(f"model.projector must be mlp2x_gelu or linear, not '{self.projector}'")
        if self.projector_init not in ("torch", "normal"):
            raise UserError(f"model.projector_init must be torch or normal, not '{self.projector_init}'")
        if self.attn not in ("auto", "flash_attention_2", "sdpa", "eager"):
            raise UserError(f"model.attn must be auto, flash_attention_2, sdpa or eager, not '{self.attn}'")


@dataclass
class DataSection:
    train: str | None = None  # LLaVA JSON/JSONL file, or a Hugging Face dataset name/path
    eval: str | None = None  # held-out file in the same format (same image folder): eval loss while training
    image_folder: str | None = None
    template: str | None = None  # default: plain (align), vicuna_v1 (tune)
    image_mode: str | None = None  # default: crop (align), pad (tune), as the paper's scripts
    max_length: int = 2048
    # text: max_length counts text ids, an image as one (the authors' cut; sequences reach max_length + 575 at 336 px)
    # total: every position counts, image tokens included (a hard cap on memory)
    length_mode: str = "text"
    group_by_length: bool = True  # batches of similar length: less padding
    packing: bool = False  # several samples per row, no padding between them (batch counts rows, not samples)
    # rows of this many tokens, as given; unset: the row length with the least estimated work, and no packing when
    # none saves enough over unpacked batches (3%, 20% on the CPU: packing.py)
    packing_row_length: int | None = None
    skip_bad: bool = False  # set bad records aside in rejects.jsonl instead of stopping
    allow_outside_images: bool = False  # image names may lead outside image_folder (absolute paths on purpose)
    verify_images: bool = True  # decode every image once before training
    num_workers: int = 2
    split: str = "train"
    image_column: str = "image"
    messages_column: str | None = None

    def __post_init__(self):
        if self.max_length < 16:
            raise UserError(f"data.max_length {self.max_length} is too small to hold an image and a reply")
        if self.length_mode not in ("text", "total"):
            raise UserError(f"data.length_mode must be text (the authors' cut) or total, not '{self.length_mode}'")
        if self.image_mode not in (None, "pad", "crop"):
            raise UserError(f"data.image_mode must be pad or crop, not '{self.image_mode}'")
        if self.packing_row_length is not None and self.packing_row_length < 16:
            raise UserError(f"data.packing_row_length {self.packing_row_length} is too small for one sample; unset it "
                            "to let --packing choose")


@dataclass
class TrainSection:
    mode: str = "align"  # align | lora | qlora | full
    global_batch: int = 256  # the batch the recipe reproduces; accumulation is derived from it
    per_device_batch: int = 32
    lr: float = 1e-3
    projector_lr: float | None = None  # lora/qlora/full: the projector's own rate (LLaVA-1.5's mm_projector_lr)
    optim: str = "adamw_torch_fused"  # the authors': adamw_torch (same maths, unfused kernels)
    max_grad_norm: float = 1.0  # 0: no clipping (the authors' DeepSpeed configs set none)
    loss_average: str = "tokens"  # tokens: mean over every supervised token of the step (all GPUs, accumulation);
    # batch: mean over each micro-batch's tokens, then averaged over GPUs and accumulation (the authors')
    lean_metrics: bool = True  # token entropy / accuracy computed on the steps that log, not on every step
    epochs: float = 1.0
    max_steps: int = -1  # > 0 stops early (smoke runs)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    bf16: bool = True
    tf32: bool = True
    gradient_checkpointing: bool = True
    reentrant_checkpointing: bool = False  # torch's reentrant checkpoint, as the authors' transformers 4.31 used
    lora_r: int = 64  # higher: more capacity and memory
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    seed: int = 42
    logging_steps: int = 1
    save_steps: int = 500
    eval_steps: int = 0  # with data.eval: evaluate every N steps; 0: at the end of each epoch
    save_total_limit: int = 2
    report_to: str = "auto"  # auto: TensorBoard when installed; none; or wandb, swanlab, tensorboard, ... (comma list)
    deepspeed: str | None = None  # a DeepSpeed JSON (paper: ZeRO-2 for align, ZeRO-3 for tune)
    fsdp: str | None = None  # instead of DeepSpeed: full_shard (like ZeRO-3) | shard_grad_op (like ZeRO-2), "+ offload"

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"train.mode must be {', '.join(MODES[:-1])} or {MODES[-1]}, not '{self.mode}'")
        if self.global_batch < 1 or self.per_device_batch < 1:
            raise UserError("train.global_batch and train.per_device_batch must be at least 1")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"train.warmup_ratio must be in [0, 1), not {self.warmup_ratio}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise UserError(f"train.lr must be positive, not {self.lr}")
        if self.projector_lr is not None and (self.projector_lr <= 0 or not math.isfinite(self.projector_lr)):
            raise UserError(f"train.projector_lr must be positive (or none: the same as train.lr), not {self.projector_lr}")
        if self.loss_average not in ("tokens", "batch"):
            raise UserError(f"train.loss_average must be tokens or batch (the authors'), not '{self.loss_average}'")
        if self.max_grad_norm < 0:
            raise UserError(f"train.max_grad_norm must be 0 (no clipping) or positive, not {self.max_grad_norm}")
        self.fsdp_options  # noqa: B018 (raises on a bad value)
        if self.eval_steps < 0:
            raise UserError(f"train.eval_steps must be 0 (every epoch) or positive, not {self.eval_steps}")

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
    stage: str = "align"  # align | tune
    output_dir: str | None = None
    reproduces: str = ""  # what the recipe reproduces, e.g. "paper stage 1: global batch 256, lr 1e-3"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self):
        if self.stage not in ("align", "tune"):
            raise UserError(f"stage must be align or tune, not '{self.stage}'")

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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> "Recipe":
        """Cross-field rules, checked once every override is in."""
        if self.stage == "align" and self.train.mode != "align":
            raise UserError(f"stage align trains the projector only; train.mode must be align, not '{self.train.mode}'")
        if self.stage == "tune" and self.train.mode == "align":
            raise UserError("stage tune needs a mode: pass --lora, --qlora or --full")
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
        return self


def deepspeed_path(name: str | None) -> str | None:
    """The DeepSpeed JSON a recipe names (None: no DeepSpeed). Recipes name shipped files relative to the
    repository (`recipes/deepspeed/zero3.json`); that works from any working directory and in an installed
    package, where recipes/ ships as qilin_lite/recipes."""
    if not name:
        return None
    for p in (Path(name), REPO_RECIPES.parent / name):
        if p.is_file():
            return str(p)
    raise UserError(f"{name}: DeepSpeed config not found; give a path that exists (shipped: recipes/deepspeed/)")


SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection}


def _build(cls, values: dict, source: str, prefix: str = ""):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UserError(
            f"{source}: unknown key '{prefix}{unknown[0]}'; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for k, v in values.items():
        if k in SECTIONS and cls is Recipe:
            if not isinstance(v, dict):
                raise UserError(f"{source}: '{k}' must be a mapping of settings")
            kwargs[k] = _build(SECTIONS[k], v, source, prefix=f"{k}.")
        else:
            kwargs[k] = _coerce(names[k], v, source, prefix + k)
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value: Any, source: str, key: str):
    t = str(f.type)
    if value is None:
        return None
    if "None" in t and not t.startswith(("bool", "int", "float")) and (
            value is False or (isinstance(value, str) and value.strip().lower() in ("none", "null", "off", "false", ""))):
        # an optional setting switched off (--set train.deepspeed=none); YAML reads a bare `off` as false
        return None
    try:
        if t.startswith("bool"):
            if not isinstance(value, bool):
                raise ValueError
            return value
        if t.startswith("int"):
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if t.startswith("float"):
            return float(value)
        if t.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: '{key}' must be {t.split(' ')[0]}, got {value!r}") from None
    return value


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
        except yaml.YAMLError as e:
            raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"{p}: a recipe must be a mapping of settings")
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like section.key=value, e.g. train.lr=2e-4")
        key, raw = item.split("=", 1)
        _set(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    for key, value in fields_.items():
        if value is not None:
            _set(data, key, value)
    return _build(Recipe, data, source)


def _set(data: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"cannot set '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def save_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.to_dict(), allow_unicode=True, sort_keys=False), encoding="utf-8")
