"""`qilin-lite convert SRC DST`: a checkpoint in the original LLaVA repository layout -> a transformers Llava directory.

In:  SRC, a directory (or hub id) as the original LLaVA code saves it, which is how the Qilin-Med-VL authors released
     `williamliu/Qilin-Med-VL(-Chat)`: config.json with `architectures: ["LlavaLlamaForCausalLM"]`, `model_type:
     "llava"`, the LLaMA settings and `mm_*` keys; LLaMA weights under `model.embed_tokens`, `model.layers.*`,
     `model.norm`, `lm_head`; the projector under `model.mm_projector.0.*` / `.2.*` (mlp2x_gelu) or
     `model.mm_projector.*` (linear); a LLaMA tokenizer without `<image>` (LLaVA spliced images in at index -200).
     Weights as model.safetensors, sharded safetensors with model.safetensors.index.json, or, only with
     `allow_pickle`, PyTorch pickles (pytorch_model*.bin, read with `torch.load(weights_only=True)`).
     The vision tower is not in the checkpoint: it comes from the CLIP model that `mm_vision_tower` names (a private
     path in the Qilin release) or `vision_tower=` (`--vision-tower`) overrides.
     Also HuatuoGPT-Vision's release (`LlavaQwen2ForCausalLM`, `model_type: "llava_qwen2"`): Qwen2 weights under
     the same names, and its CLIP tower both in the weights (`model.vision_tower.vision_tower.*`, used: safetensors)
     and in `./vit/clip_vit_large_patch14_336` beside them (only its config and preprocessing are read: its weights
     are a pickle). Converted with the `huatuo` template and its cli.py's decoding defaults in generation_config.json.
Out: DST with safetensors shards + index in the layout transformers itself saves Llava in, config (LlavaConfig:
     CLIP layer -2, patch tokens only, the projector's activation), a minimal generation config, tokenizer with
     `<image>` added, image processor, LlavaProcessor with the `vicuna_v1` chat template, qilin.json (kind
     "converted", template vicuna_v1, image mode from `image_aspect_ratio`: pad) and conversion.json (provenance).

Adding `<image>` grows the vocabulary by one row. The image token's input embedding is never read (the model puts
image features there), so its row is the mean of the others; its lm_head row is zero and the generation config
suppresses it, so the converted model predicts exactly the tokens the original could.

Tensors are streamed one source shard at a time (each source shard becomes one output shard), so converting a 13B
model needs memory for one shard, not for the model. Every key and shape is checked against the target model (on the
meta device) before anything is written.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import UserError
from .weights import open_safetensors

log = logging.getLogger(__name__)

TEMPLATE = "vicuna_v1"  # LLaVA "v1" conversation, what Qilin-Med-VL-Chat was tuned with
QWEN2_TEMPLATE = "huatuo"  # the llava_qwen2 release convert reads is HuatuoGPT-Vision's
CKPT_VISION = "model.vision_tower.vision_tower."  # a CLIP tower saved inside the checkpoint (HuatuoGPT-Vision)
SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
PICKLE_INDEX, PICKLE_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
# LLaVA-only config keys that must not leak into the LLaMA text config
LLAVA_KEYS = ("image_aspect_ratio", "image_grid_pinpoints", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
              "use_mm_proj", "tokenizer_padding_side", "tokenizer_model_max_length", "architectures", "model_type",
              "_name_or_path", "transformers_version", "auto_map", "torch_dtype", "dtype")
# source prefix -> prefix in the files transformers writes for Llava (it renames them to modules on load)
RENAMES = (
    ("model.embed_tokens.", "language_model.model.embed_tokens."),
    ("model.layers.", "language_model.model.layers."),
    ("model.norm.", "language_model.model.norm."),
    ("lm_head.", "language_model.lm_head."),
)
# on-disk name -> module name, to check the result against the model transformers builds
ON_LOAD = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
# Not converted: vision tower copies (the CLIP model supplies them) and the rotary buffer that old transformers
# versions saved and every version recomputes.
SKIP = (re.compile(r"^model\.vision_tower\."), re.compile(r"rotary_emb\.inv_freq$"))


# ---------------------------------------------------------------- reading the source


def resolve_source(src: str, allow_pickle: bool) -> Path:
    """A local directory as is; a hub id downloaded (config, tokenizer, weights; pickles only when allowed)."""
    p = Path(src)
    if p.is_dir():
        return p
    if p.exists() or src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise UserError(f"{src}: not a checkpoint directory; pass the folder holding config.json and the weights")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.model", "*.txt", "*.safetensors"] + (["*.bin"] if allow_pickle else [])
    try:
        return Path(snapshot_download(src, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo: all fixable by the user
        raise UserError(f"{src}: cannot download ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def read_config(src: Path) -> dict:
    f = src / "config.json"
    if not f.is_file():
        raise UserError(f"{src}: no config.json; is this a LLaVA checkpoint directory?")
    cfg = json.loads(f.read_text(encoding="utf-8"))
    archs = cfg.get("architectures") or []
    if "text_config" in cfg or "LlavaForConditionalGeneration" in archs:
        raise UserError(f"{src}: already a transformers Llava directory; use it directly (chat --model {src})")
    if cfg.get("model_type") != "llava" and not any("Llava" in a for a in archs):
        raise UserError(
            f"{src}: config.json is not an original-LLaVA config (model_type '{cfg.get('model_type')}', "
            f"architectures {archs}); convert takes LlavaLlamaForCausalLM checkpoints"
        )
    if "mm_hidden_size" not in cfg:
        raise UserError(f"{src}: config.json has no mm_hidden_size; is the projector part of this checkpoint?")
    if cfg.get("mm_use_im_start_end"):
        raise UserError(f"{src}: mm_use_im_start_end is true; only checkpoints without <im_start>/<im_end> "
                        "are supported")
    if cfg.get("mm_vision_select_feature", "patch") not in ("patch", "cls_patch"):
        raise UserError(f"{src}: mm_vision_select_feature '{cfg['mm_vision_select_feature']}' is not supported "
                        "(patch, cls_patch)")
    if cfg.get("image_aspect_ratio") not in (None, "pad", "square"):
        raise UserError(f"{src}: image_aspect_ratio '{cfg['image_aspect_ratio']}' is not supported (pad, square)")
    if cfg.get("mm_projector_type", "linear") not in ("linear", "mlp2x_gelu"):
        raise UserError(f"{src}: mm_projector_type '{cfg['mm_projector_type']}' is not supported (linear, mlp2x_gelu)")
    if cfg.get("tie_word_embeddings"):
        raise UserError(f"{src}: tied word embeddings are not supported (LLaMA-based LLaVA checkpoints are untied)")
    return cfg


def weight_files(src: Path, allow_pickle: bool) -> list[Path]:
    """The checkpoint's weight files, in index order; pickles only with allow_pickle."""
    for index, single, pickled in ((SAFE_INDEX, SAFE_SINGLE, False), (PICKLE_INDEX, PICKLE_SINGLE, True)):
        if not ((src / index).is_file() or (src / single).is_file()):
            continue
        if pickled and not allow_pickle:
            raise UserError(
                f"{src}: the weights are PyTorch pickle files ({single}*), which can run code when loaded; "
                "pass --allow-pickle if you trust their source (they are then read with weights_only=True)"
            )
        if (src / index).is_file():
            weight_map = json.loads((src / index).read_text(encoding="utf-8"))["weight_map"]
            files = [src / name for name in dict.fromkeys(weight_map.values())]
        else:
            files = [src / single]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{src}: weight file(s) {', '.join(missing[:3])} listed but missing; finish the download")
        return files
    raise UserError(f"{src}: no weights found ({SAFE_SINGLE}, {SAFE_INDEX}, {PICKLE_SINGLE} or {PICKLE_INDEX})")


def iter_tensors(path: Path) -> Iterator[tuple[str, "torch.Tensor"]]:  # noqa: F821
    """(name, tensor) of one weight file, one tensor in memory at a time for safetensors (mmap for pickles)."""
    if path.suffix == ".safetensors":
        with open_safetensors(path) as f:  # a truncated file: one line naming it
            for name in f.keys():
                yield name, f.get_tensor(name)
        return
    yield from _load_pickle(path).items()


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes without reading the data (safetensors header; memory-mapped pickles)."""
    if path.suffix == ".safetensors":
        with open_safetensors(path) as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    return {name: tuple(t.shape) for name, t in _load_pickle(path).items()}


def _load_pickle(path: Path) -> dict:
    import pickle

    import torch

    try:
        try:  # memory-mapped: tensors are read from disk as they are copied out, not all at once
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: holds objects other than tensors, which weights_only loading refuses; "
                        "re-save it as a plain state dict or as safetensors") from None
    except (OSError, EOFError, RuntimeError) as e:
        raise UserError(f"{path}: cannot read the weights ({type(e).__name__}); the file may be truncated") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a state dict of tensors")
    return state


# ---------------------------------------------------------------- names


def target_name(name: str, projector: str, vision_in_ckpt: bool = False) -> str | None:
    """Source tensor name -> name in the converted files; None to skip; UserError for names convert does not know."""
    if vision_in_ckpt and name.startswith(CKPT_VISION) and not name.endswith("position_ids"):
        return "vision_tower." + name[len(CKPT_VISION):]
    if any(p.search(name) for p in SKIP):
        return None
    for old, new in RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    m = re.fullmatch(r"model\.mm_projector\.(?:(\d+)\.)?(weight|bias)", name)
    if m:
        layer, kind = m.groups()
        if projector == "linear" and layer is None:
            return f"multi_modal_projector.linear_1.{kind}"
        if projector == "mlp2x_gelu" and layer in ("0", "2"):
            return f"multi_modal_projector.linear_{1 if layer == '0' else 2}.{kind}"
    raise UserError(f"unexpected tensor '{name}' for an original-LLaVA checkpoint with a {projector} projector")


def projector_type(names) -> str:
    names = set(names)
    if "model.mm_projector.0.weight" in names and "model.mm_projector.2.weight" in names:
        return "mlp2x_gelu"
    if "model.mm_projector.weight" in names:
        return "linear"
    raise UserError("no projector weights (model.mm_projector.*) in the checkpoint; convert needs a full LLaVA "
                    "checkpoint, not the LLM alone")


def module_name(disk_name: str) -> str:
    for old, new in ON_LOAD:
        if disk_name.startswith(old):
            return new + disk_name[len(old):]
    return disk_name


# ---------------------------------------------------------------- conversion


def family(cfg: dict) -> str:
    """qwen2 for `llava_qwen2` checkpoints (HuatuoGPT-Vision-7B), else llama (LLaVA, Qilin-Med-VL)."""
    archs = cfg.get("architectures") or []
    return "qwen2" if cfg.get("model_type") == "llava_qwen2" or any("Qwen2" in a for a in archs) else "llama"


def text_config(cfg: dict, vocab_size: int, pad_token_id: int):
    from transformers import LlamaConfig, Qwen2Config

    keep = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k not in LLAVA_KEYS}
    if keep.get("rope_scaling") is None:
        keep.pop("rope_scaling", None)  # an explicit null only earns a deprecation warning
    keep.update(vocab_size=vocab_size, pad_token_id=pad_token_id)
    qwen = family(cfg) == "qwen2"
    text = (Qwen2Config if qwen else LlamaConfig)(**keep)
    text.architectures = ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"]
    return text


def vision_source(src_dir: Path, cfg: dict, override: str | None) -> str:
    """Where the CLIP config (and, unless the checkpoint has them, weights) come from: `--vision-tower`, else
    `mm_vision_tower`, a relative one resolved against the checkpoint (HuatuoGPT-Vision ships `./vit/...`)."""
    vision = override or cfg.get("mm_vision_tower")
    if not vision:
        raise UserError(f"{src_dir}: config.json names no mm_vision_tower; "
                        "pass --vision-tower openai/clip-vit-large-patch14-336")
    if not override and (src_dir / vision).is_dir():
        return str((src_dir / vision).resolve())
    if not override and not Path(vision).exists() and (vision.startswith((".", "/", "~")) or vision.count("/") > 1):
        raise UserError(f"{src_dir}: config.json's vision tower '{vision}' is a path that is not here; pass "
                        "--vision-tower openai/clip-vit-large-patch14-336 (or a local copy of it)")
    return vision


def convert_checkpoint(src: str | Path, dst: str | Path, *, vision_tower: str | None = None,
                       allow_pickle: bool = False, template: str | None = None) -> Path:
    """Convert an original-LLaVA checkpoint (Qilin-Med-VL's release format) into a transformers Llava directory."""
    from .merge import check_out_dir

    src_dir = resolve_source(str(src), allow_pickle)
    dst = Path(dst)
    cfg = read_config(src_dir)
    files = weight_files(src_dir, allow_pickle)  # before torch and any slow load: a refused pickle fails at once
    check_out_dir(dst, src_dir)

    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel, GenerationConfig, LlavaConfig

    from .families import IMAGE_TOKEN, get_template
    from .model import RunInfo, friendly_load, load_image_processor, load_tokenizer, save_processor, torch_dtype

    qwen = family(cfg) == "qwen2"
    template = template or (QWEN2_TEMPLATE if qwen else TEMPLATE)
    chat_format = get_template(template)  # an unknown name fails before any work
    vision = vision_source(src_dir, cfg, vision_tower)
    dtype_name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16")
    dt = torch_dtype(dtype_name)

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        shapes.update(tensor_shapes(f))
    projector = projector_type(shapes)
    declared = cfg.get("mm_projector_type", "linear")
    if declared != projector:
        log.warning("config says mm_projector_type %s but the weights are %s; following the weights",
                    declared, projector)

    # a tower saved in the checkpoint is the one the model was trained with; the named CLIP then gives its config
    in_ckpt = not vision_tower and any(k.startswith(CKPT_VISION) for k in shapes)
    if in_ckpt:
        vision_config = friendly_load(CLIPVisionConfig.from_pretrained, vision, "vision tower config (CLIP)")
        vision_state = {}
    else:
        try:
            vision_model = friendly_load(CLIPVisionModel.from_pretrained, vision, "vision tower (CLIP)", dtype=dt,
                                          use_safetensors=None if allow_pickle else True)
        except UserError as e:
            if vision_tower:
                raise
            raise UserError(f"{src}: the checkpoint has no vision tower, and the one its config names does not load "
                            f"({e}); pass the CLIP tower it was trained with: --vision-tower ID_OR_PATH") from None
        vision_config = vision_model.config
        vision_state = {"vision_tower." + k: v.to(dt) for k, v in vision_model.state_dict().items()}
        del vision_model
    image_processor = load_image_processor(vision)
    if vision_config.hidden_size != cfg["mm_hidden_size"]:
        raise UserError(f"{vision}: hidden size {vision_config.hidden_size} != the checkpoint's mm_hidden_size "
                        f"{cfg['mm_hidden_size']}; pass the vision tower it was trained with (--vision-tower)")
    tok = load_tokenizer(str(src_dir))
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token  # as LLaVA v1 training did
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if EMBED not in shapes or LM_HEAD not in shapes:
        raise UserError(f"{src_dir}: {EMBED} or {LM_HEAD} missing; is the checkpoint complete?")
    rows = shapes[EMBED][0]
    vocab = max(rows, image_id + 1, len(tok))

    select = cfg.get("mm_vision_select_feature", "patch")
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config(cfg, vocab, tok.pad_token_id),
        image_token_id=image_id,
        projector_hidden_act="gelu" if projector == "mlp2x_gelu" else "linear",
        vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        image_seq_length=patches + (0 if select == "patch" else 1),
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = dt

    # Plan every output name and shape, and check them against the model transformers will build, before writing.
    planned: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        new = target_name(name, projector, in_ckpt)
        if new is not None:
            planned[new] = (vocab,) + shape[1:] if name in (EMBED, LM_HEAD) else shape
    planned.update({k: tuple(v.shape) for k, v in vision_state.items()})
    extra = {}
    if projector == "linear":  # a single linear layer: an identity linear_2 (and act "linear") keeps it exact
        h = config.text_config.hidden_size
        extra = {"multi_modal_projector.linear_2.weight": torch.eye(h, dtype=dt),
                 "multi_modal_projector.linear_2.bias": torch.zeros(h, dtype=dt)}
        planned.update({k: tuple(v.shape) for k, v in extra.items()})
    _check_plan(planned, config, src_dir)

    dst.mkdir(parents=True, exist_ok=True)
    n = len(files) + (1 if vision_state or extra else 0)
    weight_map: dict[str, str] = {}
    total = 0
    for i, f in enumerate(files, start=1):
        log.info("converting %s (%d/%d)", f.name, i, len(files))
        out = {}
        for name, t in iter_tensors(f):
            new = target_name(name, projector, in_ckpt)
            if new is None:
                continue
            t = t.to(dt) if t.is_floating_point() else t
            if name in (EMBED, LM_HEAD) and t.shape[0] < vocab:
                t = _grow_rows(t, vocab, mean=name == EMBED)
            out[new] = t.contiguous()
        total += _save_shard(out, dst, i, n, weight_map, save_file)
        del out
    if vision_state or extra:
        total += _save_shard({**vision_state, **extra}, dst, n, n, weight_map, save_file)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    config.save_pretrained(dst)
    own = dict(chat_format.generation)  # the model's own decoding (HuatuoGPT-Vision: its cli.py's gen_kwargs)
    if own:
        own.update(do_sample=True, temperature=0.2, max_new_tokens=512)
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        suppress_tokens=[image_id],  # never generate the placeholder the original model did not have
        **own,
    ).save_pretrained(dst)
    save_processor(dst, tok, image_processor, config, template)
    image_mode = "pad" if cfg.get("image_aspect_ratio") == "pad" else "crop"
    RunInfo(kind="converted", base=None, template=template, image_mode=image_mode).save(dst)
    source = str(Path(src).resolve()) if Path(src).is_dir() else str(src)
    provenance = {"source": source, "vision_tower": vision, "vision_weights": "checkpoint" if in_ckpt else vision,
                  "llm": family(cfg), "template": template, "projector": projector, "dtype": dtype_name,
                  "image_token_id": image_id, "added_rows": vocab - rows}
    (dst / "conversion.json").write_text(json.dumps(provenance, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return dst


def _grow_rows(t, rows: int, *, mean: bool):
    import torch

    new = t.float().mean(0, keepdim=True).to(t.dtype) if mean else torch.zeros(1, t.shape[1], dtype=t.dtype)
    return torch.cat([t, new.expand(rows - t.shape[0], -1)])


def _save_shard(tensors: dict, dst: Path, i: int, n: int, weight_map: dict, save_file) -> int:
    name = f"model-{i:05d}-of-{n:05d}.safetensors"
    save_file(tensors, str(dst / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in tensors})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _check_plan(planned: dict[str, tuple[int, ...]], config, src: Path) -> None:
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlavaForConditionalGeneration(config).state_dict().items()}
    got = {module_name(k): v for k, v in planned.items()}
    missing = sorted(set(expected) - set(got))
    if missing:
        raise UserError(f"{src}: the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}; is it complete? "
                        "(a missing vision tower is supplied with --vision-tower)")
    unexpected = sorted(set(got) - set(expected))
    if unexpected:
        raise UserError(f"{src}: tensors the config does not account for, e.g. {unexpected[:3]}")
    wrong = [f"{k} {got[k]} != {expected[k]}" for k in expected if got[k] != expected[k]]
    if wrong:
        raise UserError(f"{src}: tensor shapes disagree with config.json, e.g. {wrong[0]}")


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert_command(
        src: Annotated[str, typer.Argument(help="original-LLaVA checkpoint directory or hub id (e.g. williamliu/Qilin-Med-VL-Chat)")],
        dst: Annotated[Path, typer.Argument(help="new directory for the transformers Llava model")],
        vision_tower: Annotated[Optional[str], typer.Option("--vision-tower", help="CLIP model instead of config's mm_vision_tower (Qilin-Med-VL: openai/clip-vit-large-patch14-336)")] = None,
        allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="accept pytorch_model*.bin (pickles can run code)")] = False,
        template: Annotated[Optional[str], typer.Option("--template", help="chat template of the converted model (default: vicuna_v1 for LLaVA/Qilin-Med-VL, huatuo for llava_qwen2)")] = None,
    ):
        """Import a checkpoint in the original LLaVA layout (the Qilin-Med-VL release) as a transformers Llava model."""
        done = convert_checkpoint(src, dst, vision_tower=vision_tower, allow_pickle=allow_pickle, template=template)
        typer.echo(f"converted: {done}  (next: qilin-lite chat IMAGE --model {done})")
