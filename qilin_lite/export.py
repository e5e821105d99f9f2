"""`qilin-lite export gguf RUN_DIR OUT_DIR`: a trained model -> two GGUF files llama.cpp and Ollama run on a CPU.

In:  any directory `chat` accepts: a lora / qlora / align run (merged first, unquantized, as `merge` does) or a full,
     merged, converted or base Llava directory. The LLM must be LLaMA-shaped with LLaMA's SentencePiece
     `tokenizer.model` (Qilin-Med-VL's is), the vision tower CLIP, the projector mlp2x_gelu (LLaVA-1.5's shape).
Out: OUT_DIR/<name>-<quant>.gguf     the language model, its tokenizer (pieces, scores, types from tokenizer.model)
                                     and a chat template that places the image as training did;
     OUT_DIR/mmproj-<name>-f16.gguf  the CLIP tower up to the feature layer the run used (layer -2, CLS dropped) +
                                     the projector, with the run's image mean/std and image rule;
     OUT_DIR/Modelfile               for `ollama create` (vicuna_v1 template, system prompt, `</s>` stop, notice);
     OUT_DIR/README.md               the llama.cpp command line and what differs from `qilin-lite chat`.

Writing uses `gguf` (the format's own Python writer); the tensors go out one at a time, so the memory needed is one
tensor, not the model. q8_0 / q4_k_m are made from the f16 file by llama.cpp's own quantizer (llama-cpp-python's
binding, or a `llama-quantize` binary on PATH). Nothing is downloaded.

What llama.cpp does differently (said in OUT_DIR/README.md):
- Images: llama.cpp's LLaVA-1.5 path resizes the longer side to the tower's size and pads with CLIP's mean colour;
  training padded to a square first, then resized. An image already padded to the tower's size (what
  `qilin-lite image` writes) passes through llama.cpp unchanged, so the pixels equal training's.
- The projector's GELU is ggml's tanh approximation; training used the exact (erf) one.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from .errors import UserError

log = logging.getLogger(__name__)

QUANTS = ("f16", "q8_0", "q4_k_m")
LLAMA_FTYPES = {"q8_0": 7, "q4_k_m": 15}  # llama.h's LLAMA_FTYPE_MOSTLY_*
QUANTIZE_NAMES = {"q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}  # llama-quantize's names
MARKER = "<__media__>"  # llama.cpp's (mtmd's) default image marker in prompt text
NOTICE = "Research model output, not a diagnosis; a clinician must check every answer."

# transformers writes a Llava's tensors under one of these prefixes (5.x: module paths; 4.x and `convert`: the
# legacy on-disk names). Stripped, a name starts at the part's own root.
PREFIXES = {
    "llm": ("model.language_model.", "language_model.model."),
    "head": ("lm_head.", "language_model.lm_head."),
    "vision": ("model.vision_tower.vision_model.", "model.vision_tower.", "vision_tower.vision_model.", "vision_tower."),
    "projector": ("model.multi_modal_projector.", "multi_modal_projector."),
}
LLM_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
VISION_NAMES = {
    "embeddings.class_embedding": "v.class_embd",
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "pre_layrnorm.weight": "v.pre_ln.weight",
    "pre_layrnorm.bias": "v.pre_ln.bias",
}
VISION_LAYER_NAMES = {  # CLIP's fc1 is the up projection (hidden -> 4 x hidden): llama.cpp's ffn_up
    "layer_norm1": "ln1", "layer_norm2": "ln2", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.out_proj": "attn_out", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}


@dataclass
class Exported:
    model: Path
    mmproj: Path
    modelfile: Path
    readme: Path
    seconds: float = 0.0


# ---------------------------------------------------------------- reading the model directory


class Weights:
    """Names -> (file, key) over a directory's safetensors shards; tensors read one at a time as float32 numpy."""

    def __init__(self, model_dir: Path):
        from .convert import tensor_shapes

        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise UserError(f"{model_dir}: no safetensors weights; export reads safetensors only")
        self.where: dict[str, tuple[Path, str]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            try:
                shapes = tensor_shapes(f)
            except Exception as e:  # noqa: BLE001 - safetensors' own error types: a truncated or foreign file
                raise UserError(f"{f}: cannot read its safetensors header ({type(e).__name__}); the file is truncated "
                                "or not safetensors: copy or download it again") from None
            for key, shape in shapes.items():
                part, rest = _split(key)
                if part is not None:
                    self.where[f"{part}:{rest}"] = (f, key)
                    self.shapes[f"{part}:{rest}"] = shape

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> np.ndarray:
        import torch
        from safetensors import safe_open

        f, key = self.where[name]
        with safe_open(str(f), framework="pt") as h:
            return h.get_tensor(key).to(torch.float32).numpy()


def _split(key: str) -> tuple[str | None, str]:
    for part, prefixes in PREFIXES.items():
        for p in prefixes:
            if key.startswith(p):
                return part, key[len(p):]
    return None, key


def check_exportable(cfg: dict, model_dir: Path) -> None:
    """Refuse, in one line each, what llama.cpp's LLaVA-1.5 path cannot represent."""
    text, vision = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    fix = "; export covers LLaVA-1.5-shaped models (LLaMA + CLIP + mlp2x_gelu), as Qilin-Med-VL is"
    if text.get("model_type") != "llama":
        raise UserError(f"{model_dir}: the LLM is '{text.get('model_type')}', and export writes llama.cpp's llama "
                        f"architecture only{fix}")
    if vision.get("model_type") != "clip_vision_model":
        raise UserError(f"{model_dir}: the vision tower is '{vision.get('model_type')}', not CLIP{fix}")
    if vision.get("hidden_act") not in ("quick_gelu", "gelu"):
        raise UserError(f"{model_dir}: the vision tower's activation '{vision.get('hidden_act')}' has no llama.cpp "
                        "CLIP equivalent (quick_gelu, gelu)")
    if vision.get("intermediate_size") == vision.get("hidden_size"):
        raise UserError(f"{model_dir}: a CLIP tower whose MLP keeps its width is read by llama.cpp as one with "
                        "up and down swapped (its fix for old files); this tower cannot be exported")
    if cfg.get("projector_hidden_act", "gelu") != "gelu":
        raise UserError(f"{model_dir}: projector activation '{cfg.get('projector_hidden_act')}'; llama.cpp's "
                        "LLaVA projector is linear -> GELU -> linear")
    if cfg.get("vision_feature_select_strategy", "default") != "default":
        raise UserError(f"{model_dir}: vision_feature_select_strategy '{cfg['vision_feature_select_strategy']}'; "
                        "llama.cpp's LLaVA path drops CLIP's CLS token, as 'default' does")
    if not isinstance(cfg.get("vision_feature_layer", -2), int):
        raise UserError(f"{model_dir}: several vision feature layers ({cfg['vision_feature_layer']}); "
                        "export takes one, as LLaVA-1.5 has")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        raise UserError(f"{model_dir}: RoPE scaling '{rope.get('rope_type') or rope.get('type')}' is not exported "
                        "(LLaMA-2 has none)")
    if text.get("attention_bias") or text.get("mlp_bias"):
        raise UserError(f"{model_dir}: the LLM's linear layers have biases, which LLaMA-2 has not; not exported")
    if not (model_dir / "tokenizer.model").is_file():
        raise UserError(
            f"{model_dir}: no SentencePiece tokenizer.model; llama.cpp encodes LLaMA models with LLaMA's "
            "SentencePiece vocabulary, and this model's tokenizer is only a tokenizer.json. Train (or convert) with "
            "the LLM's own tokenizer.model beside it"
        )


def vision_layers_used(cfg: dict) -> int:
    """How many CLIP blocks the run's features pass through: hidden_states[k] is the output of k blocks."""
    n = cfg["vision_config"]["num_hidden_layers"]
    k = cfg.get("vision_feature_layer", -2)
    used = k if k >= 0 else n + 1 + k
    if not 0 < used <= n:
        raise UserError(f"vision_feature_layer {k} is outside the tower's {n} layers")
    return used


# ---------------------------------------------------------------- writing


def _dtype_for(array_shape: tuple[int, ...], name: str) -> type:
    """f16 for matrices; f32 for vectors and the embeddings llama.cpp adds in f32 (its own converters' choice)."""
    if len(array_shape) == 1 or name in ("v.class_embd", "v.position_embd.weight"):
        return np.float32
    return np.float16


def _write(path: Path, arch: str, kv, tensors: list[tuple[str, tuple[int, ...], callable]]) -> None:
    """One GGUF file, tensors streamed: headers first (shapes only), then each tensor's data as it is made."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    kv(w)
    for name, shape, _ in tensors:
        dt = np.dtype(_dtype_for(shape, name))
        w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, make in tensors:
        data = np.ascontiguousarray(make(), dtype=_dtype_for(shape, name))
        if data.shape != tuple(shape):
            raise RuntimeError(f"{name}: made {data.shape}, announced {shape}")
        w.write_tensor_data(data)
    w.close()


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' LLaMA rotates the two halves of each head; llama.cpp's rotates adjacent pairs: reorder rows."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_chat_template(system: str) -> str:
    """vicuna_v1 as training rendered it, for llama.cpp: images arrive as mtmd's marker in the text (llama-server
    turns image parts into marker text, llama-mtmd-cli appends the marker to the prompt); a turn with one image gets
    it at its front, a newline, and the text stripped: the authors' placement (conversation.place_image). An earlier
    answer that a client sends back with the space the model generated first (llama-server's replies start with it)
    gets no second space after `ASSISTANT:`.

    Kept under 1024 bytes: llama-cpp-python 0.3 reads metadata strings through a 1024-byte buffer, and a longer
    template reaches its jinja parser cut off, which fails loading the model. Literal spaces are expressions, as
    transformers and llama-cpp-python render with trim_blocks / lstrip_blocks."""
    sys_default = system.replace("'", "\\'")
    m = MARKER
    t = (
        f"{{% set ns = namespace(i=0, s='{sys_default}') %}}"
        "{% if messages[0]['role'] == 'system' %}{% set ns.s = messages[0]['content'] %}{% set ns.i = 1 %}{% endif %}"
        "{% if ns.s %}{{ ns.s + ' ' }}{% endif %}"
        "{% for x in messages[ns.i:] %}"
        "{% set c = x['content'] if x['content'] is string else x['content'] | map(attribute='text') | join('') %}"
        "{% if x['role'] == 'user' %}{{ 'USER: ' }}"
        f"{{% if c.split('{m}') | length == 2 %}}{{{{ ('{m}\\n' + c.replace('{m}', '').strip()).strip() }}}}"
        "{% else %}{{ c }}{% endif %}{{ ' ' }}"
        "{% else %}{{ 'ASSISTANT:' + ('' if c.startswith(' ') else ' ') + c + '</s>' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )
    if len(t.encode()) >= 1024:
        raise UserError(f"the chat template with this system prompt is {len(t.encode())} bytes; llama-cpp-python "
                        "reads at most 1023: shorten the template's system prompt")
    return t


def _tokenizer_kv(w, model_dir: Path, tok, vocab_rows: int) -> None:
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((model_dir / "tokenizer.model").read_bytes())
    tokens, scores, types = [], [], []
    for p in proto.pieces:
        tokens.append(p.piece.encode("utf-8"))
        scores.append(p.score)
        types.append(int(p.type))  # SentencePiece's and GGUF's type numbers agree (normal 1 ... byte 6)
    added = {i: t for t, i in tok.get_vocab().items() if i >= len(tokens)}
    for i in range(len(tokens), vocab_rows):
        if i in added:  # `<image>` and friends: control tokens, never produced by encoding plain text
            tokens.append(added[i].encode("utf-8"))
            types.append(int(gguf.TokenType.CONTROL))
        else:
            tokens.append(f"[PAD{i}]".encode())
            types.append(int(gguf.TokenType.UNUSED))
        scores.append(-1000.0)
    if len(tokens) != vocab_rows:
        raise UserError(f"{model_dir}: tokenizer.model has {len(proto.pieces)} pieces, more than the model's "
                        f"{vocab_rows} embedding rows; the tokenizer does not belong to these weights")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))
    for setter, tid in ((w.add_bos_token_id, tok.bos_token_id), (w.add_eos_token_id, tok.eos_token_id),
                        (w.add_unk_token_id, tok.unk_token_id), (w.add_pad_token_id, tok.pad_token_id)):
        if tid is not None:
            setter(int(tid))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def write_llm(path: Path, model_dir: Path, cfg: dict, weights: Weights, tok, template, name: str) -> None:
    import gguf

    t = cfg["text_config"]
    n_head, n_kv = t["num_attention_heads"], t.get("num_key_value_heads") or t["num_attention_heads"]
    head_dim = t.get("head_dim") or t["hidden_size"] // n_head
    rope = t.get("rope_parameters") or {}
    theta = rope.get("rope_theta") or t.get("rope_theta") or 10000.0
    vocab_rows = weights.shapes["llm:embed_tokens.weight"][0]

    def kv(w):
        w.add_name(name)
        w.add_description(f"exported by qilin-lite from {model_dir.name}; {NOTICE}")
        w.add_context_length(int(t.get("max_position_embeddings", 4096)))
        w.add_embedding_length(int(t["hidden_size"]))
        w.add_block_count(int(t["num_hidden_layers"]))
        w.add_feed_forward_length(int(t["intermediate_size"]))
        w.add_rope_dimension_count(int(head_dim))
        w.add_head_count(int(n_head))
        w.add_head_count_kv(int(n_kv))
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
        w.add_layer_norm_rms_eps(float(t.get("rms_norm_eps", 1e-5)))
        w.add_rope_freq_base(float(theta))
        w.add_vocab_size(int(vocab_rows))
        w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
        _tokenizer_kv(w, model_dir, tok, vocab_rows)
        w.add_chat_template(gguf_chat_template(template.system))

    def make(key: str, post=None):
        return lambda: post(weights.get(key)) if post else weights.get(key)

    tensors = []
    for src, dst in (("embed_tokens.weight", "token_embd.weight"), ("norm.weight", "output_norm.weight")):
        tensors.append((dst, weights.shapes[f"llm:{src}"], make(f"llm:{src}")))
    head = "head:weight" if weights.has("head:weight") else None
    if head:  # an absent head means tied embeddings: llama.cpp then reads token_embd
        tensors.append(("output.weight", weights.shapes[head], make(head)))
    for i in range(t["num_hidden_layers"]):
        for src, dst in LLM_NAMES.items():
            if src in ("embed_tokens.weight", "norm.weight"):
                continue
            key = f"llm:layers.{i}.{src}"
            if not weights.has(key):
                raise UserError(f"{model_dir}: tensor for layer {i} '{src}' missing; the weights are incomplete")
            post = None
            if src == "self_attn.q_proj.weight":
                post = lambda a: _permute(a, n_head)  # noqa: E731
            elif src == "self_attn.k_proj.weight":
                post = lambda a: _permute(a, n_kv)  # noqa: E731
            tensors.append((f"blk.{i}.{dst}", weights.shapes[key], make(key, post)))
    _write(path, "llama", kv, tensors)


def write_mmproj(path: Path, model_dir: Path, cfg: dict, weights: Weights, image_processor, image_mode: str,
                 name: str) -> None:
    import gguf

    v = cfg["vision_config"]
    used = vision_layers_used(cfg)
    mean, std = list(image_processor.image_mean), list(image_processor.image_std)
    proj_out = weights.shapes["projector:linear_2.weight"][0]

    def kv(w):
        w.add_name(f"mmproj-{name}")
        w.add_description(
            f"CLIP tower (first {used} of {v['num_hidden_layers']} blocks: feature layer "
            f"{cfg.get('vision_feature_layer', -2)}, CLS dropped) + mlp2x_gelu projector, exported by qilin-lite. "
            f"Trained on images made square by '{image_mode}' "
            + ("(padded with the mean colour, then resized)" if image_mode == "pad" else "(resized, centre-cropped)")
            + "; send what `qilin-lite image` writes for the same pixels. " + NOTICE
        )
        w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
        w.add_bool("clip.has_vision_encoder", True)
        w.add_bool("clip.has_llava_projector", True)
        w.add_string("clip.projector_type", "mlp")
        w.add_bool("clip.use_gelu", v.get("hidden_act") == "gelu")  # false: CLIP's quick_gelu
        w.add_uint32("clip.vision.image_size", int(v["image_size"]))
        w.add_uint32("clip.vision.patch_size", int(v["patch_size"]))
        w.add_uint32("clip.vision.embedding_length", int(v["hidden_size"]))
        w.add_uint32("clip.vision.feed_forward_length", int(v["intermediate_size"]))
        w.add_uint32("clip.vision.projection_dim", int(proj_out))
        w.add_uint32("clip.vision.attention.head_count", int(v["num_attention_heads"]))
        w.add_float32("clip.vision.attention.layer_norm_epsilon", float(v.get("layer_norm_eps", 1e-5)))
        # only the blocks the features pass through are written; the feature layer says "after all of them", so
        # llama.cpp neither runs one block short (its default for LLaVA files) nor applies the post-layernorm
        w.add_uint32("clip.vision.block_count", int(used))
        w.add_array("clip.vision.feature_layer", [int(used)])
        w.add_array("clip.vision.image_mean", [float(x) for x in mean])
        w.add_array("clip.vision.image_std", [float(x) for x in std])
        w.add_string("qilin.image_mode", image_mode)

    tensors = []
    for src, dst in VISION_NAMES.items():
        key = f"vision:{src}"
        if weights.has(key):
            tensors.append((dst, weights.shapes[key], (lambda k: lambda: weights.get(k))(key)))
    for i in range(used):
        for src, dst in VISION_LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                key = f"vision:encoder.layers.{i}.{src}.{kind}"
                if weights.has(key):
                    tensors.append((f"v.blk.{i}.{dst}.{kind}", weights.shapes[key],
                                    (lambda k: lambda: weights.get(k))(key)))
    for layer, idx in (("linear_1", 0), ("linear_2", 2)):
        for kind in ("weight", "bias"):
            key = f"projector:{layer}.{kind}"
            if not weights.has(key):
                raise UserError(f"{model_dir}: projector tensor '{layer}.{kind}' missing; export needs the "
                                "mlp2x_gelu projector (two linear layers with biases)")
            tensors.append((f"mm.{idx}.{kind}", weights.shapes[key], (lambda k: lambda: weights.get(k))(key)))
    _write(path, "clip", kv, tensors)


# ---------------------------------------------------------------- quantizing


def find_quantizer():
    """llama.cpp's quantizer: llama-cpp-python's binding, else a `llama-quantize` binary; None when neither."""
    try:
        import llama_cpp  # noqa: F401

        return "binding"
    except Exception:  # noqa: BLE001 - ImportError, or a library that fails to load: both mean "not usable"
        pass
    return shutil.which("llama-quantize")


def quantize(src: Path, dst: Path, quant: str, quantizer) -> None:
    import os
    import subprocess

    if quantizer == "binding":
        import ctypes

        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPES[quant]
        params.nthread = os.cpu_count() or 1
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    else:
        rc = subprocess.run([quantizer, str(src), str(dst), QUANTIZE_NAMES[quant]], capture_output=True).returncode
    if rc != 0 or not dst.is_file():
        raise RuntimeError(f"llama.cpp's quantizer failed ({rc}) on {src}")


# ---------------------------------------------------------------- the command


def model_name(run_dir: Path) -> str:
    import re

    name = re.sub(r"[^\w.-]+", "-", run_dir.resolve().name, flags=re.UNICODE).strip("-")
    return name or "model"


def export_gguf(run_dir: str | Path, out_dir: str | Path, *, quant: str = "f16", name: str | None = None) -> Exported:
    """Write OUT_DIR's GGUF files, Modelfile and README for the model in RUN_DIR; return their paths."""
    import time

    from .conversation import get_template
    from .merge import STANDALONE, check_out_dir, merge_run
    from .model import RunInfo, load_tokenizer_and_processor, resolve_base

    t0 = time.time()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("export gguf writes with the `gguf` package: pip install 'qilin-lite[gguf]'") from None
    info = RunInfo.load(run_dir) if run_dir.is_dir() else None
    if info is None:
        raise UserError(f"{run_dir}: not a qilin-lite model directory (no qilin.json); pass what align, tune, "
                        "merge or convert wrote")
    check_out_dir(out_dir, run_dir)
    quantizer = find_quantizer() if quant != "f16" else None
    if quant != "f16" and quantizer is None:  # before any work: a 13B merge takes minutes
        raise UserError(f"--quant {quant} uses llama.cpp's quantizer, which is not installed: "
                        "`pip install llama-cpp-python` (builds llama.cpp) or put llama-quantize on PATH; "
                        "or export --quant f16")
    name = name or model_name(run_dir)
    if info.template != "vicuna_v1":  # the GGUF's chat template is written for the dialog template only
        raise UserError(f"{run_dir}: trained with the '{info.template}' template (an align run captions images); "
                        "export a tune run, or a merged / converted model, which chat with vicuna_v1")
    template = get_template(info.template)
    standalone = info.kind in STANDALONE + ("converted",)
    # everything that can refuse is checked on the run's own files, before a merge that takes minutes at 13B
    config_dir = run_dir if standalone else Path(resolve_base(run_dir, info))
    if not (config_dir / "config.json").is_file():
        raise UserError(f"{config_dir}: no config.json; export needs the model's (or, for a run, its base's) "
                        "directory on this machine")
    check_exportable(json.loads((config_dir / "config.json").read_text(encoding="utf-8")), run_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
            model_dir = run_dir
            if not standalone:
                log.info("merging %s (%s) before export", run_dir, info.kind)
                model_dir = merge_run(run_dir, Path(tmp) / "merged")
            cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
            tok, ip = load_tokenizer_and_processor(str(model_dir))
            weights = Weights(model_dir)
            f16 = out_dir / f"{name}-f16.gguf"
            llm_f16 = f16 if quant == "f16" else Path(tmp) / f16.name
            write_llm(llm_f16, model_dir, cfg, weights, tok, template, name)
            model_path = out_dir / f"{name}-{quant}.gguf"
            if quant != "f16":
                quantize(llm_f16, model_path, quant, quantizer)
            mmproj = out_dir / f"mmproj-{name}-f16.gguf"
            write_mmproj(mmproj, model_dir, cfg, weights, ip, info.image_mode, name)
    except BaseException:
        if created:  # nothing half-written is left to look like an export
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    modelfile = out_dir / "Modelfile"
    modelfile.write_text(ollama_modelfile(model_path.name, mmproj.name, template.system), encoding="utf-8")
    readme = out_dir / "README.md"
    readme.write_text(export_readme(model_path.name, mmproj.name, name, info.image_mode), encoding="utf-8")
    return Exported(model_path, mmproj, modelfile, readme, round(time.time() - t0, 1))


# vicuna_v1 as training rendered it (conversation.render after place_image), in Ollama's Go template language.
# What Ollama hands a template that names `.Messages` (read in ollama/ollama at fb30760: server/prompt.go,
# template/template.go): `.System`, every system message joined; `.Messages`, each with Role, Content and Images;
# a user message's images are put in front of its text as `[img-N]` tags (N counts the conversation's images)
# unless the text holds `[img]`, and llama-server later swaps each tag for the image. So a message with exactly
# one image that starts with its tag gets the newline training put after the image; Go templates have no string
# search, hence the tag's end found by position (N up to 999). Not done here, as Go templates cannot: stripping
# the text (Ollama's CLI trims it; API clients send it as they like) and moving an `[img]` the user placed inside
# the text to the front. An assistant message: one space after `ASSISTANT:` (none added when the stored reply
# already starts with the space the model generated) and `</s>`, except on a last assistant message, which Ollama
# continues. Only `{{ " " }}`-style literals carry spaces: `{{-` would trim bare ones.
OLLAMA_TEMPLATE = """\
{{- if .System }}{{ .System }}{{ " " }}{{ end }}
{{- range $i, $m := .Messages }}
  {{- if eq $m.Role "user" }}{{ "USER: " }}
    {{- $c := $m.Content }}{{ $end := 0 }}
    {{- if and (eq (len $m.Images) 1) (ge (len $c) 7) (eq (slice $c 0 5) "[img-") }}
      {{- if eq (slice $c 6 7) "]" }}{{ $end = 7 }}
      {{- else if and (ge (len $c) 8) (eq (slice $c 7 8) "]") }}{{ $end = 8 }}
      {{- else if and (ge (len $c) 9) (eq (slice $c 8 9) "]") }}{{ $end = 9 }}
      {{- end }}
    {{- end }}
    {{- if and $end (lt $end (len $c)) }}{{ slice $c 0 $end }}{{ "\\n" }}{{ slice $c $end }}
    {{- else }}{{ $c }}
    {{- end }}{{ " ASSISTANT:" }}
  {{- else if eq $m.Role "assistant" }}
    {{- if not (and $m.Content (eq (slice $m.Content 0 1) " ")) }}{{ " " }}{{ end }}{{ $m.Content }}
    {{- if gt (len (slice $.Messages $i)) 1 }}</s>{{ end }}
  {{- end }}
{{- end }}"""


def ollama_modelfile(model: str, mmproj: str, system: str) -> str:
    return (
        f"# {NOTICE}\n"
        "# ollama create NAME -f Modelfile   (then: ollama run NAME \"问题 ./image.png\")\n"
        f"FROM ./{model}\n"
        f"FROM ./{mmproj}\n"
        f'TEMPLATE """{OLLAMA_TEMPLATE}"""\n'
        f'SYSTEM """{system}"""\n'
        'PARAMETER stop "</s>"\n'
        "PARAMETER temperature 0\n"
    )


def export_readme(model: str, mmproj: str, name: str, image_mode: str) -> str:
    rule = ("padded to a square in the processor's mean colour" if image_mode == "pad"
            else "resized and centre-cropped")
    return f"""# {name}: GGUF export (qilin-lite)

> {NOTICE}

Run on a CPU with llama.cpp. Send images as `qilin-lite image` writes them (the run trained on images {rule};
an image already square at the tower's size passes through llama.cpp's resizing unchanged):

    qilin-lite image scan.dcm --model <the run> --out scan.png
    llama-mtmd-cli -m {model} --mmproj {mmproj} --jinja --image scan.png -p "这张图像显示了什么？" --temp 0

`--jinja` makes llama.cpp use the chat template inside {model} (the run's vicuna_v1, the image at the front of the
turn as in training); without it llama.cpp's built-in "vicuna" format adds newlines training never saw.
llama-server: `llama-server -m {model} --mmproj {mmproj} --jinja --host 127.0.0.1` (OpenAI-compatible API).
Ollama: `ollama create {name} -f Modelfile` (its template renders the prompt as training did; write the question
alone and give the image as a file, and Ollama puts it in front).

Known llama.cpp bug (issue 25814): its LLaVA graph puts CLIP's CLS token last while its inputs assume it first, so
image features are shifted by one patch. Use a llama.cpp built with the fix (PR 25844) for answers equal to
`qilin-lite chat`'s. Other differences: llama.cpp's projector GELU is the tanh approximation (training: exact);
{model} is {'f16' if model.endswith('-f16.gguf') else 'quantized'}.
"""


def register(app: typer.Typer) -> None:
    export_app = typer.Typer(no_args_is_help=True, help="Write a trained model in another runtime's format.")
    app.add_typer(export_app, name="export")

    @export_app.command("gguf")
    def gguf_command(
        run_dir: Annotated[Path, typer.Argument(help="any directory chat accepts (a LoRA/QLoRA run is merged first)")],
        out_dir: Annotated[Path, typer.Argument(help="new directory for the GGUF files, Modelfile and README")],
        quant: Annotated[str, typer.Option("--quant", help="f16 | q8_0 | q4_k_m (the language model; mmproj stays f16)")] = "f16",
        name: Annotated[Optional[str], typer.Option("--name", help="file name stem (default: RUN_DIR's name)")] = None,
    ):
        """GGUF for llama.cpp / Ollama: the language model + an mmproj (CLIP + projector) to run on a CPU."""
        done = export_gguf(run_dir, out_dir, quant=quant, name=name)
        typer.echo(f"exported: {done.model}\n          {done.mmproj}\n          {done.modelfile}")
        typer.echo(f"next: llama-mtmd-cli -m {done.model} --mmproj {done.mmproj} --jinja --image IMAGE.png -p QUESTION "
                   f"--temp 0  (see {done.readme})")
