"""Memory planner: a recipe -> per-GPU memory estimate, whether it fits, and the smallest change that makes it fit.

In:  a recipe plus the run's shape (GPUs, GPU memory, per-device batch, max length, mode, dtype).
Out: a `Plan`: exact parameter counts per group (models built on the meta device from configs, nothing downloaded),
     bytes per component at the step's peak, a verdict and, when it does not fit, a suggested change with its flags.
     `qilin-lite plan` prints it as a table, or JSON with `--json`.

What is modelled is this repository's training path, tensor by tensor (see `layer_activation_bytes`):
- transformers 5 Llava: the frozen CLIP tower runs forward only and keeps only the selected layer's output;
- LLaMA decoder layers: saved tensors counted per op, as in Korthikanti et al. (2022), but for RMSNorm (saves an
  fp32 copy of its input), SwiGLU and flash / memory-efficient attention (q, k, v, output and log-sum-exp only: no
  s x s scores; sdpa with a padding mask keeps one b x s x s bias per layer; eager keeps the fp32 scores);
- peft LoRA (fp32 adapters; dropout keeps a mask and the adapter's input), bitsandbytes NF4 (no activations saved),
  and QLoRA's fp32 norms (`stages.norms_to_fp32`): their fp32 outputs make the residual stream fp32 from the first
  layer on, while the vision tower, embeddings and lm_head stay in the load dtype;
- trl >= 1's SFTTrainer loss: a chunked LM head (4096 tokens x 32768 vocabulary tiles), so the b x s x vocab logits
  are never materialised (`fused_lm_head=False` models the classic fp32-logits cross-entropy instead);
- torch fused AdamW (the Trainer's default): m and v in the parameter's dtype; outside DeepSpeed train.py keeps every
  trained parameter in fp32 (frozen ones in the load dtype) and autocast computes in bf16; DeepSpeed ZeRO:
  bf16 weights and gradients, fp32 master + m + v (12 bytes per trained parameter) sharded over the GPUs from stage 1,
  gradients from stage 2, weights from stage 3 (which then gathers two decoder layers at a time);
- peak = persistent state (weights, optimizer, persistent gradients) + the largest of: start of backward (all saved
  activations + the LM head's backward buffers), the top and the bottom decoder layer's backward (with the layer's
  recompute under checkpointing; the bottom one beside the gradients of every layer above), the end of backward,
  the optimizer step, the vision forward;
- on a GPU, a fixed allowance: 1 GiB for the CUDA context, cuBLAS workspaces and NCCL buffers, plus 5% of the peak
  for the caching allocator's fragmentation.
The estimate is validated against the measured peaks of training steps on the CPU, in float32 and in bf16 with
autocast (`benchmarks/plan_accuracy.py`). Two CPU kernels differ from the GPU's (dropout keeps a float mask, trl's
LM head falls back to torch ops), which `Settings(device="cpu")` models; the GPU-only terms (CUDA allowance,
DeepSpeed buffers and sharding, the Triton LM head) follow the libraries' code and are not measured here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import UserError

GiB = 1024**3
CUDA_CONTEXT_BYTES = 1 * GiB  # CUDA context + cuBLAS workspaces + NCCL buffers, per GPU
FRAGMENTATION = 0.05  # caching-allocator slack, as a share of the allocated peak
TOKEN_TILE, VOCAB_TILE = 4096, 32768  # trl's chunked LM head tiles (trl/kernels/chunked_logprob.py)
# trl's torch fallback (no Triton: CPU only) keeps this many fp32 (tokens x vocabulary) temporaries alive at its
# forward and backward peaks, measured with the profiler (benchmarks/plan_accuracy.py --head)
CPU_TILE_TEMPS = (3.25, 7.25)
MODES = ("align", "lora", "qlora", "full")
ATTENTION = ("auto", "flash_attention_2", "sdpa", "eager")

# The paper's models, written out so that planning needs no download (values from their hub config.json files).
CLIP_VIT_L14_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
    patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
LLAMA2_13B = dict(
    hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
    vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
)
KNOWN_VISION = {"openai/clip-vit-large-patch14-336": CLIP_VIT_L14_336}
KNOWN_LLM = {
    "FlagAlpha/Llama2-Chinese-13b-Chat": LLAMA2_13B,
    "meta-llama/Llama-2-13b-hf": LLAMA2_13B,
    "meta-llama/Llama-2-13b-chat-hf": LLAMA2_13B,
}


# ---------------------------------------------------------------------------------------------------------------
# What the configs say: exact parameter counts per group (meta device) and the shapes the activations need


@dataclass(frozen=True)
class Shape:
    """Parameter counts per group and the sizes the activation formulas use."""

    vision: int  # CLIP tower (frozen in every mode)
    projector: int
    decoder_linear: int  # weights (+ biases) of the LLM decoder's nn.Linear layers: what 4-bit quantizes
    decoder_other: int  # RMSNorm weights inside the decoder layers
    embeddings: int
    final_norm: int
    lm_head: int  # 0 when tied to the embeddings
    linears: tuple  # ((name, in_features, out_features, has_bias), ...) of every LLM decoder linear layer
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int  # key/value heads x head dim
    head_dim: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_tokens: int  # patches + CLS, what the tower computes
    image_tokens: int  # what one image becomes in the LLM's sequence
    image_size: int
    linear_projector: bool

    @property
    def total(self) -> int:
        return (self.vision + self.projector + self.decoder_linear + self.decoder_other + self.embeddings
                + self.final_norm + self.lm_head)

    @property
    def llm(self) -> int:
        return self.decoder_linear + self.decoder_other + self.embeddings + self.final_norm + self.lm_head

    @property
    def layer_params(self) -> int:
        return (self.decoder_linear + self.decoder_other) // self.layers

    def lora_params(self, r: int) -> int:
        """A (r x in) + B (out x r) on every targeted linear: exactly what peft adds."""
        return sum(r * (i + o) for _, i, o, _ in self.linears)

    def groups(self) -> dict[str, int]:
        return {"vision tower": self.vision, "projector": self.projector, "LLM decoder linear": self.decoder_linear,
                "LLM decoder norms": self.decoder_other, "LLM embeddings": self.embeddings,
                "LLM final norm": self.final_norm, "lm_head": self.lm_head}


def count_parameters(config) -> Shape:
    """A LlavaConfig -> `Shape`, counting on a model built on the meta device (no memory, no download)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from .model import num_image_tokens
    from .stages import LORA_TARGETS

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)

    def n(module) -> int:
        return sum(p.numel() for p in module.parameters())

    lm = model.model.language_model
    linears, decoder_linear = [], 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.language_model.layers."):
            decoder_linear += n(mod)
            if re.fullmatch(LORA_TARGETS, name):
                linears.append((name, mod.in_features, mod.out_features, mod.bias is not None))
    tied = model.lm_head.weight is lm.embed_tokens.weight
    tc, vc = config.text_config, config.vision_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    shape = Shape(
        vision=n(model.model.vision_tower), projector=n(model.model.multi_modal_projector),
        decoder_linear=decoder_linear, decoder_other=n(lm.layers) - decoder_linear, embeddings=n(lm.embed_tokens),
        final_norm=n(lm.norm), lm_head=0 if tied else n(model.lm_head), linears=tuple(linears),
        hidden=tc.hidden_size, intermediate=tc.intermediate_size, layers=tc.num_hidden_layers,
        heads=tc.num_attention_heads, kv_dim=(tc.num_key_value_heads or tc.num_attention_heads) * head_dim,
        head_dim=head_dim, vocab=tc.vocab_size, vision_hidden=vc.hidden_size,
        vision_intermediate=vc.intermediate_size, vision_tokens=(vc.image_size // vc.patch_size) ** 2 + 1,
        image_tokens=num_image_tokens(config), image_size=vc.image_size,
        linear_projector=config.projector_hidden_act == "linear",
    )
    assert shape.total == n(model), "parameter groups do not add up to the model"
    return shape


def llava_config(vision: dict, llm: dict, projector: str = "mlp2x_gelu", vision_feature_layer: int = -2):
    """Two plain config dicts -> the LlavaConfig `assemble_base` would write (the LLM gains the `<image>` token)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vc = CLIPVisionConfig(**vision)
    tc = LlamaConfig(**{**llm, "vocab_size": llm["vocab_size"] + 1})
    return LlavaConfig(
        vision_config=vc, text_config=tc, image_token_id=llm["vocab_size"],
        projector_hidden_act="gelu" if projector == "mlp2x_gelu" else "linear",
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default",
        image_seq_length=(vc.image_size // vc.patch_size) ** 2, tie_word_embeddings=llm.get("tie_word_embeddings", False),
    )


def _local_config(source: str, what: str) -> dict:
    p = Path(source)
    if (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text(encoding="utf-8"))
    try:  # a hub id already in the local cache
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source, local_files_only=True).to_dict()
    except (OSError, ValueError):
        raise UserError(
            f"{source}: no config for the {what} here and nothing is downloaded; give a local directory "
            f"(the planner knows {', '.join(sorted(KNOWN_VISION if what == 'vision encoder' else KNOWN_LLM))} by heart)"
        ) from None


def recipe_config(recipe):
    """The LlavaConfig a recipe trains: its base / align run's base, or vision + LLM joined as `assemble_base` does."""
    from transformers import LlavaConfig

    from .model import RunInfo, resolve_base

    m = recipe.model
    base = m.base
    if m.from_run:
        info = RunInfo.load(Path(m.from_run))
        if info is None:
            raise UserError(
                f"{m.from_run}: not a qilin-lite run directory (no qilin.json); pass --set model.from_run=ALIGN_DIR")
        base = resolve_base(Path(m.from_run), info)
    if base:
        cfg = _local_config(base, "Llava base")
        if cfg.get("model_type") != "llava":
            raise UserError(f"{base}: not a Llava model (model_type {cfg.get('model_type')!r})")
        return LlavaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    vision = KNOWN_VISION.get(m.vision) or _vision_dict(_local_config(m.vision, "vision encoder"))
    llm = KNOWN_LLM.get(m.llm) or _local_config(m.llm, "LLM")
    return llava_config(vision, llm, m.projector, m.vision_feature_layer)


def _vision_dict(cfg: dict) -> dict:
    cfg = cfg.get("vision_config", cfg)  # a full CLIP directory holds the tower's config inside
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
            "projection_dim", "hidden_act", "layer_norm_eps", "num_channels")
    return {k: cfg[k] for k in keep if k in cfg}


# ---------------------------------------------------------------------------------------------------------------
# Bytes per stored parameter


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """bitsandbytes NF4 storage of one weight: packed 4-bit values, the per-block absmax and the quantization maps.

    Double quantization stores the absmax of every 64-value block as uint8, itself scaled by one fp32 absmax per
    256 blocks (plus a 256-entry fp32 map and an fp32 offset); without it, one fp32 absmax per block.
    ~0.5159 bytes per parameter with double quantization, 0.5625 without.
    """
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    code = 16 * 4  # the NF4 map
    if double_quant:
        return packed + blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4 + code
    return packed + 4 * blocks + code


def int8_bytes(in_features: int, out_features: int) -> int:
    """LLM.int8: one byte per weight plus an fp32 scale per output row."""
    return in_features * out_features + 4 * out_features


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ---------------------------------------------------------------------------------------------------------------
# Settings


@dataclass
class Settings:
    """Everything the estimate depends on besides the model's shape."""

    mode: str = "align"
    gpus: int = 1
    gpu_memory_gib: float = 80.0
    per_device_batch: int = 1
    global_batch: int = 1
    max_length: int = 2048
    # text: max_length counts text ids with an image as one (the authors' cut), so a sequence holds up to
    # max_length + image tokens - 1 positions, and that is what is planned; total: max_length positions
    length_mode: str = "total"
    gradient_checkpointing: bool = True
    zero_stage: int = 0  # 0: no DeepSpeed
    reduce_bucket: int | None = None  # DeepSpeed reduce_bucket_size (elements); None: "auto" = hidden^2
    fsdp: bool = False  # sharded by FSDP instead: planned as the ZeRO stage with the same bytes per parameter
    dtype: str = "bfloat16"  # the weights' dtype as loaded (model.dtype)
    mixed_precision: bool = True  # Trainer bf16/fp16: autocast (not under DeepSpeed, which casts the model instead)
    load_4bit: bool = False  # align only: the frozen decoder in NF4
    bits: int | None = None  # decoder linear storage: 4, 8 or None (derived from mode/load_4bit when None)
    lora_r: int = 64
    lora_dropout: float = 0.05
    attn: str = "auto"  # auto is planned as sdpa (what `pick_attention` falls back to without flash-attn)
    padding: bool = True  # batches hold padding, so sdpa gets a mask (group_by_length only makes it rarer)
    device: str = "cuda"  # "cpu": the CPU kernels, for validating against CPU measurements
    fused_lm_head: bool = True  # trl >= 1 SFTTrainer; False: full fp32 logits for the cross-entropy

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, not '{self.mode}'")
        if self.gpus < 1 or self.per_device_batch < 1 or self.global_batch < 1:
            raise UserError("--gpus, --batch and the global batch must be at least 1")
        if self.gpu_memory_gib <= 0:
            raise UserError(f"GPU memory must be positive, not {self.gpu_memory_gib}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"ZeRO stage must be 0-3, not {self.zero_stage}")
        if self.dtype not in DTYPE_BYTES:
            raise UserError(f"dtype must be bfloat16, float16 or float32, not '{self.dtype}'")
        if self.attn not in ATTENTION:
            raise UserError(f"attention must be one of {', '.join(ATTENTION)}, not '{self.attn}'")
        if self.device not in ("cuda", "cpu"):
            raise UserError(f"device must be cuda or cpu, not '{self.device}'")
        if self.load_4bit and self.mode != "align":
            raise UserError("load_4bit is for align; for tuning use mode qlora")
        if self.bits is None:
            self.bits = 4 if self.mode == "qlora" or self.load_4bit else None
        if self.bits not in (None, 4, 8):
            raise UserError(f"bits must be 4 or 8, not {self.bits}")
        if self.mode == "qlora" and self.bits != 4:
            raise UserError("mode qlora loads the decoder in 4-bit")

    @property
    def accumulation(self) -> int:
        per_step = self.per_device_batch * self.gpus
        if self.global_batch % per_step:
            raise UserError(
                f"global batch {self.global_batch} is not a multiple of batch {self.per_device_batch} x {self.gpus} "
                "GPU(s); choose --batch / --gpus that divide it"
            )
        return self.global_batch // per_step


def settings_from_recipe(recipe, **overrides) -> Settings:
    tr, m = recipe.train, recipe.model
    values = dict(
        mode=tr.mode, per_device_batch=tr.per_device_batch, global_batch=tr.global_batch,
        max_length=recipe.data.max_length, length_mode=recipe.data.length_mode, gradient_checkpointing=tr.gradient_checkpointing, dtype=m.dtype,
        mixed_precision=tr.bf16, load_4bit=m.load_4bit, lora_r=tr.lora_r, lora_dropout=tr.lora_dropout, attn=m.attn,
    )
    values.update(_deepspeed(tr.deepspeed))
    if tr.fsdp_options is not None:
        # fp32 trained weights + fp32 gradients + AdamW = 16 bytes per trained parameter sharded, the same as ZeRO's
        # bf16 weights + gradients + fp32 master and AdamW; full_shard frees weights after use as ZeRO-3 does.
        # train.py computes the loss without trl's fused head under FSDP, so the full logits are counted.
        values.update(fsdp=True, zero_stage=3 if tr.fsdp_options[0] else 2, fused_lm_head=False)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values["mode"] != "align":
        values["load_4bit"] = False
    return Settings(**values)


def _deepspeed(name: str | None) -> dict:
    if not name:
        return {"zero_stage": 0, "reduce_bucket": None}
    from .config import REPO_RECIPES

    for p in (Path(name), REPO_RECIPES.parent / name):
        if p.is_file():
            try:
                zero = json.loads(p.read_text(encoding="utf-8")).get("zero_optimization", {})
            except json.JSONDecodeError as e:
                raise UserError(f"{p}: not valid JSON ({e})") from None
            bucket = zero.get("reduce_bucket_size")
            return {"zero_stage": int(zero.get("stage", 0)),
                    "reduce_bucket": None if bucket in (None, "auto") else int(float(bucket))}
    raise UserError(f"{name}: DeepSpeed config not found; give a path that exists (shipped: recipes/deepspeed/)")


# ---------------------------------------------------------------------------------------------------------------
# The estimate


@dataclass
class Estimate:
    components: dict[str, int]  # bytes per GPU at the peak, in table order
    peak_phase: str
    total: int
    activations_checkpointed: int  # saved activations with checkpointing (the layers' inputs) ...
    activations_full: int  # ... and without it, for the same batch
    trainable: int
    dtypes: dict[str, str]
    phases: dict[str, int]  # allocated bytes at each candidate peak (without the CUDA allowance)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Sizes:
    """Element sizes (bytes) of the tensors the formulas count, which differ by mode, precision and device."""

    w: int  # frozen weights' dtype
    e: int  # compute dtype of matmuls (autocast) / activations
    stream: int  # residual stream (fp32 in QLoRA: its fp32 norms' outputs promote it)
    attn: int  # q, k, v, attention output as saved by the attention kernel
    mlp: int  # gate / up outputs (bitsandbytes casts its output back to the input's dtype)
    adapter: int  # LoRA A/B and their inputs' dtype
    autocast: bool


def _sizes(s: Settings) -> _Sizes:
    w = DTYPE_BYTES[s.dtype]
    deepspeed = s.zero_stage > 0
    if deepspeed:
        w = 2 if s.mixed_precision or w == 2 else 4  # DeepSpeed casts the whole model to bf16, and no autocast
    autocast = s.mixed_precision and not deepspeed
    e = 2 if autocast else w
    stream = 4 if (s.mode == "qlora" and not deepspeed) else w
    attn = e if autocast else (stream if s.bits else w)
    mlp = stream if s.bits else e
    adapter = w if deepspeed else 4
    return _Sizes(w=w, e=e, stream=stream, attn=attn, mlp=mlp, adapter=adapter, autocast=autocast)


def layer_activation_bytes(shape: Shape, s: Settings, tokens: int) -> dict[str, int]:
    """Bytes one decoder layer saves for backward, by tensor group (flash / memory-efficient attention).

    frozen weights (align, LoRA base): RMSNorm inputs in fp32 (x2), q/k/v after RoPE and the attention output
    (kept by the attention kernel), SiLU input, SiLU output and up (kept by the product);
    trained weights (full) add what their weight gradients need: the normalised inputs and the outputs of both
    norms and the down projection's input;
    LoRA adds per adapter the dropout mask and the adapter's input (as cast for lora_A), and lora_A's output.
    """
    z = _sizes(s)
    T, h, i = tokens, shape.hidden, shape.intermediate
    rows = {
        "norm inputs (fp32)": 2 * 4 * T * h,
        "attention q, k, v, out": z.attn * T * (2 * h + 2 * shape.kv_dim),
        "SwiGLU gate, act, up": 3 * z.mlp * T * i,
        "small (rsqrt, log-sum-exp)": 2 * 4 * T + 4 * T * shape.heads,
    }
    if s.mode == "full":
        rows["trained: norm outputs, down input"] = 2 * 2 * z.stream * T * h + z.mlp * T * i
        if s.attn == "eager":
            rows["trained: o_proj input"] = z.attn * T * h
    if s.mode in ("lora", "qlora"):
        mask = 0 if s.lora_dropout == 0 else (1 if s.device == "cuda" else z.adapter)
        copy = z.e if z.autocast else z.adapter
        per_layer_in = sum(inp for _, inp, _, _ in shape.linears) // shape.layers
        per_layer_r = len(shape.linears) // shape.layers * s.lora_r
        rows["LoRA dropout masks + adapter inputs"] = (mask + copy) * T * per_layer_in
        rows["LoRA A outputs"] = copy * T * per_layer_r
    if s.attn == "eager":
        b_heads_s2 = T * shape.heads * s.max_length
        rows["eager attention scores"] = (4 + (z.attn if z.attn != 4 else 0)) * b_heads_s2
    return rows


def estimate(shape: Shape, s: Settings) -> Estimate:
    """Bytes per GPU at the step's peak for `shape` trained as `s` says."""
    z = _sizes(s)
    notes: list[str] = []
    b, seq = s.per_device_batch, s.max_length
    if seq <= shape.image_tokens:
        raise UserError(f"max length {seq} leaves no room for text after the {shape.image_tokens} image tokens")
    T = b * seq
    h, L = shape.hidden, shape.layers
    N = s.gpus
    ds = s.zero_stage
    lora = shape.lora_params(s.lora_r) if s.mode in ("lora", "qlora") else 0

    # ---- weights
    other_w = z.w  # unquantized frozen weights keep the load dtype, in QLoRA too ...
    norm_w = 4 if (s.mode == "qlora" and not ds) else other_w  # ... but its norms are fp32 (stages.norms_to_fp32)
    if s.bits == 4:
        lin = sum(nf4_bytes(i * o) + (o * other_w if bias else 0) for _, i, o, bias in shape.linears)
        lin += (shape.decoder_linear - sum(i * o + (o if bias else 0) for _, i, o, bias in shape.linears)) * other_w
        lin_fmt = "NF4 + double quant"
    elif s.bits == 8:
        lin = sum(int8_bytes(i, o) + (o * other_w if bias else 0) for _, i, o, bias in shape.linears)
        lin += (shape.decoder_linear - sum(i * o + (o if bias else 0) for _, i, o, bias in shape.linears)) * other_w
        lin_fmt = "int8"
    else:
        lin, lin_fmt = shape.decoder_linear * z.w, _name(z.w, s)
    # train.py keeps every trained weight in fp32 outside DeepSpeed (AdamW on bf16 weights loses small updates)
    proj_w = 4 if not ds else z.w
    full_w = 4 if (s.mode == "full" and not ds) else None  # the whole LLM is trained: fp32 too
    proj_copy = s.mode in ("lora", "qlora")  # peft modules_to_save: a trained copy beside the frozen original
    llm_other = ((shape.decoder_other + shape.final_norm) * (full_w or norm_w)
                 + (shape.embeddings + shape.lm_head) * (full_w or other_w))
    if full_w:
        lin, lin_fmt = shape.decoder_linear * full_w, "fp32 (trained)"
    weights = {
        "weights: vision tower": shape.vision * other_w,
        "weights: projector": shape.projector * ((other_w + proj_w) if proj_copy else proj_w),
        "weights: LLM decoder linear": lin,
        "weights: LLM embeddings, lm_head, norms": llm_other,
        "weights: LoRA adapters": lora * z.adapter,
    }
    if ds == 3:
        sharded = {k: v for k, v in weights.items() if not (s.bits and k == "weights: LLM decoder linear")}
        weights.update({k: math.ceil(v / N) for k, v in sharded.items()})
        if s.bits:
            notes.append("ZeRO-3 cannot shard these bitsandbytes weights (no bnb_4bit_quant_storage): counted whole")

    # ---- trainable parameters, gradients, optimizer states
    if s.mode == "align":
        trained = [(shape.projector, proj_w)]
    elif s.mode in ("lora", "qlora"):
        trained = [(lora, z.adapter), (shape.projector, proj_w)]
    else:
        trained = [(shape.llm, full_w or z.w), (shape.projector, proj_w)]
    P = sum(n for n, _ in trained)
    comp: dict[str, int] = dict(weights)
    if ds:
        master = 4 * P
        opt = 8 * P
        grads = 2 * P if z.w == 2 else 4 * P
        comp["fp32 master weights (DeepSpeed)"] = math.ceil(master / N)
        comp["optimizer: AdamW m, v"] = math.ceil(opt / N)  # fp32
        grads_persist = math.ceil(grads / N) if ds >= 2 else grads  # contiguous gradient partition
        bucket = (s.reduce_bucket or h * h) * z.w * 2  # overlap_comm: two reduce buckets in flight
        zero_buf = {"ZeRO reduce buckets": bucket}
        if ds == 3:
            zero_buf["ZeRO-3 gathered weights (2 layers)"] = min(2 * shape.layer_params, int(1e9)) * z.w
        step_transient = math.ceil(4 * P / N)  # the gradient partition upcast to fp32 for the step
        grads_all = grads_persist
        accum_grads = grads_persist
    else:
        opt = sum(2 * n * d for n, d in trained)
        grads_all = sum(n * d for n, d in trained)
        comp["optimizer: AdamW m, v"] = opt
        zero_buf = {}
        step_transient = 0  # fused AdamW: in place
        grads_persist = 0
        accum_grads = grads_all if s.accumulation > 1 else 0  # accumulated over micro-batches

    # ---- activations
    act_full, act_ckpt, recompute, layer_peak, head_bwd, head_rows, other_rows = _activations(shape, s, z, T)
    acts = act_ckpt if s.gradient_checkpointing else act_full  # with checkpointing: the layers' inputs only
    # gradients present when the first decoder layer's backward starts: all but the embeddings', the projector's
    # and that layer's own
    if s.mode == "full":
        not_yet = (shape.embeddings + shape.projector + shape.layer_params) * z.w
    else:
        not_yet = shape.projector * proj_w + (lora // L) * z.adapter
    grads_layers = max(grads_all - not_yet, 0)
    ckpt_one = T * h * z.stream  # one checkpointed layer's input
    head_grad_live = grads_all and s.mode == "full" and not ds and not accum_grads  # lm_head grad, then layers'
    head_w_grad = (shape.lm_head or shape.embeddings) * z.w if s.mode == "full" else 0
    phases = {
        "start of backward": {"activations (saved for backward)": acts, "LM head backward buffers": head_bwd,
                              "gradients": accum_grads},
        "top layer's backward": {
            "activations (saved for backward)": acts - head_rows,
            "layer backward working set": layer_peak + (recompute if s.gradient_checkpointing else 0),
            "gradients": accum_grads or (head_w_grad if head_grad_live else 0)},
        # the bottom decoder layer: every layer above has its gradients by now (embeddings and projector not yet)
        "bottom layer's backward": {
            "activations (saved for backward)": other_rows + recompute + (ckpt_one if s.gradient_checkpointing else 0),
            "layer backward working set": layer_peak,
            "gradients": accum_grads or grads_layers},
        "end of backward": {"activations (saved for backward)": other_rows, "gradients": grads_all},
        "optimizer step": {"gradients": grads_all, "optimizer step buffers": step_transient},
        "vision forward": {"vision forward working set": _vision_forward(shape, s, z, T)},
    }
    if ds:
        for ph in phases.values():
            ph["gradients"] = max(ph.get("gradients", 0), grads_persist)
            ph.update(zero_buf)
    static = sum(comp.values())
    phase_totals = {name: static + sum(rows.values()) for name, rows in phases.items()}
    phase, rows = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    comp.update(rows)
    allocated = sum(comp.values())
    if s.device == "cuda":
        comp["CUDA context + allocator slack"] = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * allocated)
    total = sum(comp.values())

    if ds:
        what = {1: "optimizer states", 2: "optimizer states and gradients",
                3: "weights, gradients and optimizer states"}[ds]
        if s.fsdp:
            notes.append(f"FSDP ({'full_shard' if ds == 3 else 'shard_grad_op'}) planned as ZeRO-{ds}: {what} are "
                         f"1/{N} per GPU; the FSDP figures have not been measured on GPUs")
        else:
            notes.append(f"ZeRO-{ds}: {what} are 1/{N} per GPU; DeepSpeed keeps fp32 master weights")
    if s.attn in ("auto", "sdpa") and s.padding:
        notes.append("attention planned as sdpa (memory-efficient kernel: no s x s scores) with padding, so every "
                     "layer keeps a b x s x s mask bias; --set model.attn=flash_attention_2 drops it")
    notes.append("loss: trl's chunked LM head, no b x s x vocab logits" if s.fused_lm_head
                 else "loss: b x s x vocab logits in fp32, as transformers' own loss")
    dtypes = {"weights": _name(z.w, s), "decoder linear": lin_fmt, "frozen non-linear": _name(other_w, s),
              "trained": ", ".join(sorted({_name(d, s) for _, d in trained})), "compute": _name(z.e, s),
              "residual stream": _name(z.stream, s)}
    return Estimate(components=comp, peak_phase=phase, total=total, activations_checkpointed=act_ckpt,
                    activations_full=act_full, trainable=P, dtypes=dtypes, phases=phase_totals, notes=notes)


def _activations(shape: Shape, s: Settings, z: _Sizes, T: int):
    """(all saved without checkpointing, with checkpointing, layer backward peak, LM head backward, head's saved,
    what is left at the end of backward)."""
    b, seq, h, V = s.per_device_batch, s.max_length, shape.hidden, shape.vocab
    layer = sum(layer_activation_bytes(shape, s, T).values())
    masked = s.attn in ("auto", "sdpa") and s.padding
    mask_per_layer = z.attn * b * seq * seq if masked else 0  # the kernel's float bias, saved by every layer
    mask_once = b * seq * seq if masked else 0  # the boolean mask transformers builds
    # outside the layers: the image path (tower output kept by the projector, projector activations), RoPE tables,
    # the final norm, and the LM head's saved input
    n_img = b * shape.image_tokens
    proj_e = z.e if z.autocast else (4 if s.bits and s.mode in ("align", "qlora") else z.w)
    vis_dtype = 4 if (s.mode == "qlora" and s.zero_stage == 0) else z.w
    image = vis_dtype * b * shape.vision_tokens * shape.vision_hidden
    if z.autocast and vis_dtype != z.e:
        image += z.e * n_img * shape.vision_hidden
    image += proj_e * n_img * h * (1 if shape.linear_projector else 2)
    rope = 2 * b * seq * shape.head_dim * z.stream
    final_norm = 4 * T * h + (z.stream * T * h if s.mode == "full" else 0)
    inputs = 3 * 8 * T
    supervised = b * (seq - shape.image_tokens) if s.device == "cuda" else b * (seq - 1)
    lm_dtype = 4 if (s.mode == "qlora" and s.zero_stage == 0) else z.w
    ce = z.e if z.autocast else z.stream  # the head's compute dtype
    if s.fused_lm_head:
        head_saved = supervised * h * z.stream
        n_t, v_t = min(supervised, TOKEN_TILE), min(V, VOCAB_TILE)
        # the product buffer is allocated at the full tile width whatever the vocabulary
        tile = n_t * VOCAB_TILE * ce + (n_t * h * ce if z.stream != ce else 0) + (v_t * h * ce if lm_dtype != ce else 0)
        cpu_fwd, cpu_bwd = CPU_TILE_TEMPS if s.device == "cpu" else (0, 0)
        grad_w = 4 * V * h if s.mode == "full" else 0
        convert = supervised * h * z.stream if z.stream != 4 else 0
        convert += V * h * lm_dtype if (grad_w and lm_dtype != 4) else 0
        head_bwd = 4 * supervised * h + grad_w + tile + int(cpu_bwd * n_t * v_t * 4) + convert
        head_fwd = tile + int(cpu_fwd * n_t * v_t * 4)
    else:
        head_saved = z.stream * T * h if s.mode == "full" else 0
        head_fwd = T * V * (ce + (4 if ce != 4 else 0) + 4)
        head_bwd = 12 * T * V + (T * V * ce if ce != 4 else 0)
    head_bwd = max(head_bwd, head_fwd)
    outside = image + rope + final_norm + inputs + head_saved + mask_once
    act_full = shape.layers * (layer + mask_per_layer) + outside
    ckpt_inputs = shape.layers * T * h * z.stream
    recompute = layer + mask_per_layer  # one layer's activations, recomputed during its backward
    act_ckpt = ckpt_inputs + outside
    # a layer's backward: the incoming gradient and the one being accumulated (hidden), and the MLP's
    # input-gradient chain (down input, act and up gradients) while the layer's saved tensors are still alive
    layer_peak = T * (2 * h * z.stream + 3 * shape.intermediate * z.mlp)
    if s.bits:
        _, i_, o_, _ = max(shape.linears, key=lambda t: t[1] * t[2])
        layer_peak += i_ * o_ * (z.e if z.autocast else z.stream)  # the dequantized weight of one linear layer
    other = image + inputs
    return act_full, act_ckpt, recompute, layer_peak, head_bwd, head_saved, other


def _vision_forward(shape: Shape, s: Settings, z: _Sizes, T: int) -> int:
    """Frozen tower, no graph: one CLIP layer's temporaries beside the LLM's input embeddings."""
    vis_dtype = 4 if (s.mode == "qlora" and s.zero_stage == 0) else z.w
    tok = s.per_device_batch * shape.vision_tokens
    return T * shape.hidden * z.stream + tok * (3 * shape.vision_hidden + 3 * shape.vision_intermediate) * vis_dtype


def _name(nbytes: int, s: Settings) -> str:
    return {4: "fp32", 2: "fp16" if s.dtype == "float16" else "bf16"}[nbytes]


# ---------------------------------------------------------------------------------------------------------------
# Verdict and the smallest change that fits


@dataclass
class Suggestion:
    change: str  # in words
    flags: list[str]  # for `qilin-lite align/tune` (and `plan`)
    settings: Settings
    estimate: Estimate


@dataclass
class Plan:
    recipe: str
    shape: Shape
    settings: Settings
    estimate: Estimate
    fits: bool
    suggestion: Suggestion | None = None

    @property
    def capacity(self) -> int:
        return int(self.settings.gpu_memory_gib * GiB)


def fits(est: Estimate, s: Settings) -> bool:
    return est.total <= s.gpu_memory_gib * GiB


def positions(shape: Shape, s: Settings) -> Settings:
    """The settings with max_length in positions: under the authors' text cut, a sequence is the text ids plus
    each image's tokens but one (2048 + 575 at 336 px), and memory is spent on positions."""
    if s.length_mode != "text":
        return s
    return replace(s, max_length=s.max_length + shape.image_tokens - 1, length_mode="total")


def make_plan(shape: Shape, s: Settings, recipe: str = "") -> Plan:
    s = positions(shape, s)
    est = estimate(shape, s)
    ok = fits(est, s)
    return Plan(recipe, shape, s, est, ok, None if ok else suggest(shape, s))


def _batches(s: Settings, gpus: int, below: bool = False) -> list[int]:
    """Per-device batches (largest first) that keep the global batch with a whole accumulation."""
    top = s.per_device_batch - 1 if below else s.per_device_batch
    return [b for b in range(top, 0, -1) if s.global_batch % (b * gpus) == 0]


def suggest(shape: Shape, s: Settings) -> Suggestion | None:
    """The first change, in order of how little it changes the run, that fits (each with the largest batch that fits):
    1. a lower per-device batch, more accumulation (same global batch, same results);
    2. gradient checkpointing (same results, ~1/3 more compute);
    3. ZeRO-3 on the same GPUs (same results, more communication);
    4. the LLM in 4-bit NF4: align --load-4bit, tune --qlora (different numerics; for full, LoRA instead);
    5. more GPUs with ZeRO-3 (needs hardware).
    """
    ckpt = {} if s.gradient_checkpointing else {"gradient_checkpointing": True}
    candidates: list[tuple[str, dict]] = [("lower the per-device batch", {})]
    if ckpt:
        candidates.append(("turn on gradient checkpointing", ckpt))
    if s.gpus > 1 and s.zero_stage < 3 and not s.bits:
        candidates.append(("shard the weights too with ZeRO-3", {"zero_stage": 3}))
        if ckpt:
            candidates.append(("ZeRO-3 and gradient checkpointing", {"zero_stage": 3, **ckpt}))
    if not s.bits:
        four = {"load_4bit": True} if s.mode == "align" else {"mode": "qlora"}
        what = "load the frozen LLM in 4-bit" if s.mode == "align" else (
            "train QLoRA (4-bit LLM + LoRA) instead" if s.mode == "full" else "switch to QLoRA (4-bit LLM)")
        candidates.append((what, {**four, **ckpt, "bits": None}))
    for n in (2, 4, 8, 16, 32, 64):
        if n > s.gpus:
            more = {"gpus": n, "zero_stage": max(s.zero_stage, 2 if s.bits else 3), **ckpt}
            candidates.append((f"{n} GPUs with ZeRO-{more['zero_stage']}", more))
    for what, changes in candidates:
        trial = replace(s, **changes)
        for b in _batches(trial, trial.gpus, below=not changes):
            t = replace(trial, per_device_batch=b)
            est = estimate(shape, t)
            if fits(est, t):
                words = what if not changes or b == s.per_device_batch else f"{what}, batch {b}"
                if not changes:
                    words = f"lower the per-device batch to {b}"
                return Suggestion(f"{words} (accumulation {t.accumulation})", _flags(s, t), t, est)
    return None


def _flags(old: Settings, new: Settings) -> list[str]:
    flags = []
    if new.mode != old.mode:
        flags.append(f"--{new.mode}")
    if new.load_4bit and not old.load_4bit:
        flags.append("--load-4bit")
    if new.gpus != old.gpus:
        flags.append(f"--gpus {new.gpus}")
    if new.per_device_batch != old.per_device_batch:
        flags.append(f"--set train.per_device_batch={new.per_device_batch}")
    if new.gradient_checkpointing != old.gradient_checkpointing:
        flags.append("--set train.gradient_checkpointing=true")
    if new.zero_stage != old.zero_stage and old.fsdp:
        flags.append(f"--set train.fsdp={'full_shard' if new.zero_stage == 3 else 'shard_grad_op'}")
    elif new.zero_stage != old.zero_stage:
        flags.append(f"--set train.deepspeed=recipes/deepspeed/zero{new.zero_stage}.json")
    return flags


# ---------------------------------------------------------------------------------------------------------------
# From a recipe, and out to people and machines


def parse_memory(text: str) -> float:
    """'24GiB', '24GB', '24G', '24' -> 24.0 (GiB); '512MiB' -> 0.5. A GPU's "GB" are GiB (an 80 GB A100 holds 80 GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise UserError(f"GPU memory '{text}' is not a size; write e.g. 24GiB or 80GB")
    value, unit = float(m.group(1)), (m.group(2) or "gib").lower()
    return value / 1024 if unit.startswith("m") else value


def plan_recipe(
    recipe: str | Path,
    overrides: list[str] | None = None,
    *,
    gpus: int = 1,
    gpu_memory: str | float = "80GiB",
    batch: int | None = None,
    max_length: int | None = None,
    mode: str | None = None,
    dtype: str | None = None,
    device: str = "cuda",
) -> Plan:
    """A recipe file (+ `section.key=value` overrides) and the run's shape -> `Plan`."""
    from .config import load_recipe

    if mode is not None and mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, not '{mode}'")
    fields_ = {"data.max_length": max_length, "train.mode": mode, "model.dtype": dtype}
    if mode is not None:
        fields_["stage"] = "align" if mode == "align" else "tune"
    r = load_recipe(recipe, overrides, **{k: v for k, v in fields_.items() if v is not None})
    memory = gpu_memory if isinstance(gpu_memory, (int, float)) else parse_memory(gpu_memory)
    s = settings_from_recipe(r, gpus=gpus, gpu_memory_gib=memory, per_device_batch=batch, device=device)
    _ = s.accumulation  # a batch that does not divide the global batch is the user's to fix, before anything else
    return make_plan(count_parameters(recipe_config(r)), s, str(recipe))


def _gib(n: int) -> float:
    return round(n / GiB, 2)


def _describe(s: Settings, shape: Shape) -> list[str]:
    ds = f"DeepSpeed ZeRO-{s.zero_stage}" if s.zero_stage else "no DeepSpeed"
    if s.fsdp:
        ds = f"FSDP {'full_shard' if s.zero_stage == 3 else 'shard_grad_op'} (planned as ZeRO-{s.zero_stage})"
    attn = "sdpa" if s.attn == "auto" else s.attn
    return [
        f"mode {s.mode} | {s.gpus} GPU{'s' if s.gpus > 1 else ''} x {s.gpu_memory_gib:g} GiB | batch {s.per_device_batch} x "
        f"accumulation {s.accumulation} x {s.gpus} = {s.global_batch} | {s.max_length} positions ({shape.image_tokens} image)",
        f"checkpointing {'on' if s.gradient_checkpointing else 'off'} | {ds} | attention {attn} | {s.dtype}"
        f"{' + autocast' if s.mixed_precision and not s.zero_stage else ''} | {s.device}",
    ]


def _param_rows(p: Plan) -> list[tuple[str, int, str]]:
    s, sh = p.settings, p.shape
    decoder = {4: "NF4 (4-bit)", 8: "int8"}.get(s.bits, "frozen")
    trained_llm = s.mode == "full"
    rows = [
        ("vision tower", sh.vision, "frozen"),
        ("projector", sh.projector, "trained" + (" (copy beside the frozen original)" if s.mode in ("lora", "qlora") else "")),
        ("LLM decoder linear", sh.decoder_linear, "trained" if trained_llm else decoder),
        ("LLM decoder norms", sh.decoder_other, "trained" if trained_llm else "frozen"),
        ("LLM embeddings", sh.embeddings, "trained" if trained_llm else "frozen"),
        ("LLM final norm", sh.final_norm, "trained" if trained_llm else "frozen"),
        ("lm_head", sh.lm_head, "trained" if trained_llm else "frozen"),
    ]
    if s.mode in ("lora", "qlora"):
        rows.append((f"LoRA adapters (r={s.lora_r})", sh.lora_params(s.lora_r),
                     f"trained, on {len(sh.linears) // sh.layers} linear layers x {sh.layers}"))
    return rows


def format_plan(p: Plan) -> str:
    est, s = p.estimate, p.settings
    out = [f"qilin-lite plan {p.recipe}".rstrip()] + ["  " + line for line in _describe(s, p.shape)]
    out.append("  precision: " + ", ".join(f"{k} {v}" for k, v in est.dtypes.items()))
    out += ["", f"{'parameters':34} {'millions':>10}"]
    for name, n, what in _param_rows(p):
        out.append(f"  {name:32} {n / 1e6:10.1f}  {what}")
    out.append(f"  {'total':32} {p.shape.total / 1e6:10.1f}  (trained {est.trainable / 1e6:.1f})")
    out += ["", f"{'per-GPU memory at the peak (' + est.peak_phase + ')':50} {'GiB':>8}"]
    for name, n in est.components.items():
        if n:
            out.append(f"  {name:48} {n / GiB:8.2f}")
    out.append(f"  {'total':48} {est.total / GiB:8.2f}  of {s.gpu_memory_gib:g}")
    out.append(f"activations saved for backward: {est.activations_checkpointed / GiB:.2f} GiB with checkpointing, "
               f"{est.activations_full / GiB:.2f} GiB without")
    out += [f"note: {n}" for n in est.notes]
    if p.fits:
        out.append(f"verdict: fits, {(p.capacity - est.total) / GiB:.2f} GiB to spare")
    else:
        out.append(f"verdict: does not fit ({est.total / GiB:.2f} GiB needed, {s.gpu_memory_gib:g} GiB per GPU)")
        sug = p.suggestion
        if sug is None:
            out.append("no change tried fits (batch, checkpointing, ZeRO-3, 4-bit, up to 64 GPUs); shorten --max-length")
        else:
            out.append(f"smallest change that fits: {sug.change} -> {sug.estimate.total / GiB:.2f} GiB")
            out.append(f"  train with: {' '.join(f for f in sug.flags if not f.startswith('--gpus'))}"
                       + (f"  on {sug.settings.gpus} GPUs (accelerate launch --num_processes {sug.settings.gpus})"
                          if sug.settings.gpus != s.gpus else ""))
            out.append(f"  check with: qilin-lite plan {p.recipe} {' '.join(_plan_args(sug.settings, sug.flags))}")
    return "\n".join(out)


def _plan_args(s: Settings, flags: list[str]) -> list[str]:
    args = [f"--gpus {s.gpus}", f"--gpu-memory {s.gpu_memory_gib:g}GiB", f"--mode {s.mode}"]
    args += [f for f in flags if f.startswith("--set")]
    if s.load_4bit:
        args.append("--set model.load_4bit=true")
    return args


def plan_to_dict(p: Plan) -> dict:
    est, s = p.estimate, p.settings
    d = {
        "recipe": p.recipe,
        "settings": {**asdict(s), "accumulation": s.accumulation},
        "parameters": {**p.shape.groups(), "lora_adapters": p.shape.lora_params(s.lora_r) if s.mode in ("lora", "qlora") else 0,
                       "total": p.shape.total, "trained": est.trainable},
        "memory_gib": {k: _gib(v) for k, v in est.components.items()},
        "total_gib": _gib(est.total),
        "capacity_gib": s.gpu_memory_gib,
        "fits": p.fits,
        "peak_phase": est.peak_phase,
        "phases_gib": {k: _gib(v) for k, v in est.phases.items()},
        "activations_gib": {"checkpointing": _gib(est.activations_checkpointed), "no_checkpointing": _gib(est.activations_full)},
        "dtypes": est.dtypes,
        "notes": est.notes,
        "suggestion": None,
    }
    if p.suggestion:
        sug = p.suggestion
        d["suggestion"] = {"change": sug.change, "flags": sug.flags, "total_gib": _gib(sug.estimate.total),
                           "plan_command": f"qilin-lite plan {p.recipe} {' '.join(_plan_args(sug.settings, sug.flags))}",
                           "settings": {**asdict(sug.settings), "accumulation": sug.settings.accumulation}}
    return d


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan_command(
        recipe: Annotated[Path, typer.Argument(help="recipe YAML (see recipes/)")],
        gpus: Annotated[int, typer.Option("--gpus", help="GPUs the run is launched on")] = 1,
        gpu_memory: Annotated[str, typer.Option("--gpu-memory", help="memory per GPU: 24GiB, 80GB (a GPU's GB are GiB)")] = "80GiB",
        batch: Annotated[Optional[int], typer.Option("--batch", help="per-device batch (default: the recipe's)")] = None,
        max_length: Annotated[Optional[int], typer.Option("--max-length", help="the recipe's cut: text ids with an image as one (length_mode text, planned as + image tokens - 1 positions) or positions (total)")] = None,
        mode: Annotated[Optional[str], typer.Option("--mode", help="align | lora | qlora | full (default: the recipe's)")] = None,
        dtype: Annotated[Optional[str], typer.Option("--dtype", help="weights' dtype: bfloat16 | float16 | float32")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="override any recipe field: section.key=value")] = None,
    ):
        """Estimate per-GPU memory for a recipe; say whether it fits and, if not, the smallest change that does.

        Exit status: 0 fits, 1 does not fit, 2 a bad recipe or flag.
        """
        p = plan_recipe(recipe, set_, gpus=gpus, gpu_memory=gpu_memory, batch=batch, max_length=max_length, mode=mode,
                        dtype=dtype)
        typer.echo(json.dumps(plan_to_dict(p), indent=2, ensure_ascii=False) if as_json else format_plan(p))
        raise typer.Exit(0 if p.fits else 1)
