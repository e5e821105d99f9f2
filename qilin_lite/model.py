"""Build, load and save `LlavaForConditionalGeneration` models; the run directory contract.

In:  a vision encoder and an LLM (hub ids or local directories: the same code path), or an existing Llava
     directory, or a qilin-lite run directory (align / lora / qlora / full).
Out: a model (optionally 4/8-bit), its tokenizer and image processor, and `TokenLayout` facts about image tokens.

A run directory describes itself in `qilin.json`: what kind of run wrote it, which base it builds on, which
template and image mode it was trained with. `chat`, `eval`, `merge` and `tune --from` read only that.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .device import pick_attention
from .encoding import TokenLayout
from .errors import UserError
from .families import IMAGE_TOKEN, Family, chat_template_jinja, family_of_config, get_template, guess_template
from .families.llava import LLAVA
from .run_file import read_run_file
from .tokens import attach, keep_sentencepiece, slow_llama
from .weights import check_safetensors, load_safetensors

log = logging.getLogger(__name__)

RUN_FILE = "qilin.json"
PROJECTOR_FILE = "projector.safetensors"
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
# Module paths in transformers 5's Llava (every family here loads as one; families/base.py); skip lists match from
# the start of the path, so they must be full paths.
VISION, PROJECTOR, LLM = LLAVA.vision, LLAVA.projector, LLAVA.llm


@dataclass
class RunInfo:
    kind: str  # base | align | lora | qlora | full | merged | converted
    base: str | None  # what this run builds on (a Llava directory or hub id); None when self-contained
    template: str
    image_mode: str  # pad | crop
    qilin_lite_version: str = ""
    # the base an align / lora / qlora run trained on, as base_identity.identify read it; None in runs written
    # before it was recorded and in self-contained directories
    base_identity: dict | None = None

    def save(self, out: Path) -> None:
        from . import __version__

        self.qilin_lite_version = __version__
        (out / RUN_FILE).write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @staticmethod
    def load(path: Path) -> "RunInfo | None":
        f = Path(path) / RUN_FILE
        if not f.exists():
            return None
        data = read_run_file(f)  # one line for a damaged file, not a traceback in chat, merge, export
        return RunInfo(**{k: data.get(k) for k in ("kind", "base", "template", "image_mode", "qilin_lite_version",
                                                   "base_identity")})


def quantization_config(bits: int | None, compute_dtype: torch.dtype = torch.bfloat16, family: Family = LLAVA):
    """4-bit NF4 (double quantization) or 8-bit for the LLM's decoder layers only.

    The vision tower, the projector and lm_head stay unquantized: the projector must train in every mode,
    and a 4-bit lm_head costs accuracy for little memory.
    """
    if bits is None:
        return None
    from transformers import BitsAndBytesConfig

    skip = [family.vision, family.projector, "lm_head"]
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise UserError(f"quantization bits must be 4 or 8, not {bits}")


def torch_dtype(name: str) -> torch.dtype:
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError:
        raise UserError(f"dtype must be bfloat16, float16 or float32, not '{name}'") from None


def num_image_tokens(config) -> int:
    """Tokens one image expands to; 0 where the count follows each image's size (native resolution)."""
    return family_of_config(config).tokens_per_image(config)


def token_layout(config, max_length: int, length_mode: str = "text") -> TokenLayout:
    return TokenLayout(config.image_token_id, num_image_tokens(config), max_length, length_mode,
                       family_of_config(config).image_marks)


def _pretrained_kwargs(trust_remote_code: bool, allow_pickle: bool) -> dict:
    # safetensors only unless the user accepts pickle files (which can run code when loaded)
    return {"trust_remote_code": trust_remote_code, "use_safetensors": None if allow_pickle else True}


def friendly_load(fn, source: str, what: str, **kwargs):
    check_safetensors(source)  # a truncated shard: one line naming it (transformers raises safetensors' own error)
    try:
        return fn(source, **kwargs)
    except OSError as e:
        msg = str(e).splitlines()[0]
        raise UserError(
            f"{source}: cannot load the {what} ({msg}); check the id or path, and that weights are .safetensors "
            "(pass --allow-pickle to accept .bin files you trust)"
        ) from None


def assemble_base(
    vision: str,
    llm: str,
    out_dir: Path,
    *,
    projector: str = "mlp2x_gelu",
    vision_feature_layer: int = -2,
    dtype: str = "bfloat16",
    template: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    seed: int = 0,
    projector_init: str = "torch",
) -> Path:
    """Join a CLIP vision encoder and a causal LLM into one Llava directory with a fresh projector.

    The `<image>` token is added to the tokenizer (embeddings resized, new row = mean of the others) when the LLM
    lacks it. Writing the base once means every later step loads a plain Llava directory with
    `from_pretrained`, quantized or not, exactly as users of transformers and peft would. `template` None: the
    LLM's own dialog format (ChatML for Qwen2 chat models, else LLaVA's vicuna_v1).
    """
    from transformers import (
        AutoModelForCausalLM,
        CLIPVisionModel,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    if projector not in PROJECTOR_TYPES:
        raise UserError(f"projector must be one of {PROJECTOR_TYPES}, not '{projector}'")
    kw = _pretrained_kwargs(trust_remote_code, allow_pickle)
    dt = torch_dtype(dtype)
    template = template or guess_template(str(llm))
    tok = load_tokenizer(llm, "LLM tokenizer", trust_remote_code=trust_remote_code)
    image_processor = load_image_processor(vision)
    vision_model = friendly_load(CLIPVisionModel.from_pretrained, vision, "vision encoder", dtype=dt, **kw)
    layers = vision_model.config.num_hidden_layers  # its hidden states: the embeddings, then one per layer
    if not -(layers + 1) <= vision_feature_layer <= layers:
        raise UserError(f"model.vision_feature_layer {vision_feature_layer} is outside {vision}'s hidden states "
                        f"(-{layers + 1} to {layers}); the paper's is -2")
    lm = friendly_load(AutoModelForCausalLM.from_pretrained, llm, "LLM", dtype=dt, **kw)

    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        # LLaMA has no pad token; padding is masked out of attention and loss, so any id works: unk as LLaVA does
        tok.pad_token = tok.unk_token or tok.eos_token
    config = LlavaConfig(
        vision_config=vision_model.config,
        text_config=lm.config,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu" if projector == "mlp2x_gelu" else "linear",
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",  # patch tokens only, CLS dropped (LLaVA's `patch`)
        image_seq_length=(vision_model.config.image_size // vision_model.config.patch_size) ** 2,
        tie_word_embeddings=getattr(lm.config, "tie_word_embeddings", False),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision_model
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    torch.manual_seed(seed)
    # built off the meta device, so nn.Linear's own initialisation runs: the authors' (LLaVA builds nn.Linear and
    # never re-initialises it)
    proj = type(model.model.multi_modal_projector)(config)
    if projector_init == "normal":
        for layer in (proj.linear_1, proj.linear_2):
            torch.nn.init.normal_(layer.weight, std=0.02)
            torch.nn.init.zeros_(layer.bias)
    elif projector_init != "torch":
        raise UserError(f"projector_init must be torch or normal, not '{projector_init}'")
    if projector == "linear":
        # the paper's single linear layer: identity second layer, so linear_2 . linear_1 is one linear map
        torch.nn.init.eye_(proj.linear_2.weight)
        torch.nn.init.zeros_(proj.linear_2.bias)
    model.model.multi_modal_projector = proj.to(dt)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=True)
    model.config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]
    model.generation_config.pad_token_id = tok.pad_token_id
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    save_processor(out_dir, tok, image_processor, config, template)
    RunInfo(kind="base", base=None, template=template, image_mode="pad").save(out_dir)
    return out_dir


def save_processor(out_dir: Path, tokenizer, image_processor, config, template: str) -> None:
    """Tokenizer, image processor and a LlavaProcessor with the run's chat template, for plain transformers users."""
    from transformers import LlavaProcessor

    tokenizer.chat_template = chat_template_jinja(get_template(template))
    if family_of_config(config).model_class != LLAVA.model_class:
        # the files its processor class (Qwen2_5_VLProcessor, Gemma3Processor) is built from, as the hub's releases
        # ship them; the class itself is not built here: Qwen's video half needs torchvision, which CPU installs lack
        tokenizer.save_pretrained(out_dir)
        image_processor.save_pretrained(out_dir)
        return
    proc = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
    )
    proc.save_pretrained(out_dir)
    keep_sentencepiece(slow_llama(tokenizer), Path(out_dir))


def load_tokenizer(source: str, what: str = "tokenizer", trust_remote_code: bool = False):
    """AutoTokenizer, plus the authors' slow-tokenizer encoder for LLaMA SentencePiece tokenizers (tokens.py).

    Any failure is one line: a tokenizer that cannot load stops every later step anyway, and transformers' own
    message for a SentencePiece file without its library is a traceback about tiktoken."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, ImportError ...: all end the same way
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(
            f"{source}: cannot load the {what} ({type(e).__name__}: {msg}); check the id or path, that it holds "
            "tokenizer.json or a SentencePiece tokenizer.model, and that `pip install sentencepiece protobuf` is done"
        ) from None
    return attach(tok, str(source))


def load_image_processor(source: str):
    """The PIL-backed image processor, whatever else is installed: with torchvision present transformers 5 picks a
    torchvision one whose resizing gives other pixels; the authors' (and so the released weights') are PIL's."""
    from transformers import AutoImageProcessor

    return friendly_load(AutoImageProcessor.from_pretrained, str(source), "image processor", backend="pil")


def load_tokenizer_and_processor(path: str, trust_remote_code: bool = False):
    tok = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
    ip = load_image_processor(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok, ip


def load_vlm(
    path: str,
    *,
    bits: int | None = None,
    dtype: str = "bfloat16",
    attn: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device_map: dict | None = None,
):
    """A model directory or hub id of any family (a Llava, a Qwen2.5-VL, a Gemma 3: its config.json's model_type
    picks the class) -> model (4/8-bit LLM when asked). `device_map` (device.Placement's) loads the weights straight
    onto a GPU; None leaves them on the CPU."""
    import transformers

    dt = torch_dtype(dtype)
    family = family_at(str(path), trust_remote_code)
    model = friendly_load(
        getattr(transformers, family.model_class).from_pretrained,
        str(path),
        f"{family.name} model",
        dtype=dt,
        quantization_config=quantization_config(bits, dt, family),
        attn_implementation=pick_attention(attn),
        **({"device_map": device_map} if device_map is not None else {}),
        **_pretrained_kwargs(trust_remote_code, allow_pickle),
    )
    return model


def image_mode_for(config, wanted: str | None, default: str) -> str:
    """How a run shows images: a native-resolution family always `native`; LLaVA's `pad` / `crop` as asked."""
    family = family_of_config(config)
    if family.image_mode == "native":
        if wanted not in (None, "native"):
            raise UserError(f"data.image_mode={wanted}: this model sees images at their own size (native "
                            "resolution); pad and crop are for LLaVA models: drop the setting")
        return "native"
    if family.model_class != LLAVA.model_class:  # its processor's own resize (Gemma 3: 896 x 896) unless asked
        return wanted or family.image_mode
    return default


def family_at(source: str, trust_remote_code: bool = False) -> Family:
    """The family whose class a model directory or hub id loads as (its config.json's model_type)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: a config.json nested thousands deep
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"{source}: cannot read the model's config.json ({msg}); check the id or path") from None
    return family_of_config(config)


def template_of(source: str) -> str:
    """The template a model directory (a run, a Llava directory, a hub id) is prompted with, without loading it."""
    p = Path(source)
    info = RunInfo.load(p) if p.is_dir() else None
    return info.template if info is not None else guess_template(str(source))


def resolve_base(run_dir: Path, info: RunInfo) -> str:
    """The base a run builds on, as written; a relative path is relative to the run directory."""
    base = info.base
    if base and not Path(base).is_absolute() and (run_dir / base).exists():
        return str((run_dir / base).resolve())
    return base


def load_run(path: str | Path, *, bits: int | None = None, dtype: str = "bfloat16", attn: str = "auto", trainable=False,
             device_map: dict | None = None):
    """Any model directory qilin-lite accepts -> (model, tokenizer, image_processor, RunInfo).

    - a Llava directory or hub id (base, full, merged): loaded as is;
    - an align run: its base plus the trained projector;
    - a lora/qlora run: its base plus the adapter (the trained projector rides in the adapter).
    """
    p = Path(path)
    info = RunInfo.load(p) if p.is_dir() else None
    if info is None:
        info = RunInfo(kind="base", base=None, template=guess_template(str(path)), image_mode="pad")
    if info.kind in ("align", "lora", "qlora"):
        base = resolve_base(p, info)
        model = load_vlm(base, bits=bits, dtype=dtype, attn=attn, device_map=device_map)
        if info.kind == "align":
            load_projector(model, p / PROJECTOR_FILE)
        else:
            from peft import PeftModel

            check_safetensors(p, "adapter weights")
            model = PeftModel.from_pretrained(model, str(p), is_trainable=trainable)
    else:
        model = load_vlm(str(path), bits=bits, dtype=dtype, attn=attn, device_map=device_map)
    tok, ip = load_tokenizer_and_processor(str(path))
    return model, tok, ip, info


def projector_of(model):
    """The projector module of a model (inside a PeftModel too): the family's connector between vision and LLM."""
    inner = _llava(model)
    return inner.get_submodule(family_of_config(inner.config).projector)


def projector_state(model) -> dict[str, torch.Tensor]:
    proj = projector_of(model)
    return {k: v.detach().cpu().contiguous() for k, v in proj.state_dict().items()}


def projector_from_state_dict(state: dict[str, torch.Tensor], config=None) -> dict[str, torch.Tensor]:
    """The projector's entries of a whole-model state dict (as FSDP / ZeRO-3 gather it), named as in the module."""
    path = (family_of_config(config) if config is not None else LLAVA).projector
    marker = path.split(".", 1)[1] + "."  # the path below the top model ("model.") that state dicts may drop
    found = {k.split(marker, 1)[1]: v.detach().to("cpu", copy=True) for k, v in state.items() if marker in k}
    if not found:
        raise RuntimeError(f"the gathered state dict holds no {marker.rstrip('.')} weights")
    return found


def save_projector_state(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"format": "pt"})


def save_projector(model, path: Path) -> None:
    save_projector_state(projector_state(model), path)


def load_projector(model, path: Path) -> None:
    if not Path(path).exists():
        raise UserError(f"{path}: projector weights not found; is this the output directory of `qilin-lite align`?")
    proj = projector_of(model)
    state = load_safetensors(path, "projector weights")
    dtype = next(proj.parameters()).dtype
    state = {k: v.to(dtype) for k, v in state.items()}
    from torch.distributed.tensor import DTensor

    if isinstance(next(proj.parameters()), DTensor):  # FSDP shards: each process keeps its slice of the full weights
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(proj, state, options=StateDictOptions(full_state_dict=True))
        return
    proj.load_state_dict(state)


def _llava(model):
    """The family's model (LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, ...) inside a
    PeftModel, or the model itself."""
    import transformers

    from .families import FAMILIES

    classes = tuple({getattr(transformers, f.model_class) for f in FAMILIES})
    for m in (model, getattr(model, "base_model", None), getattr(getattr(model, "base_model", None), "model", None)):
        if isinstance(m, classes):
            return m
    raise TypeError(f"not a vision-language model qilin-lite knows: {type(model).__name__}")
