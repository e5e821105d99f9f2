"""The two GGUF files: the language model (weights, tokenizer, chat template) and the mmproj (CLIP tower up to
the run's feature layer + projector), written one tensor at a time with `gguf`, the format's own writer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .templates import NOTICE

log = logging.getLogger(__name__)


# transformers writes a Llava's tensors under one of these prefixes (5.x: module paths; 4.x and `convert`: the
# legacy on-disk names). Stripped, a name starts at the part's own root.
PREFIXES = {
    "llm": ("model.language_model.", "language_model.model."),
    "head": ("lm_head.", "language_model.lm_head."),
    "vision": ("model.vision_tower.vision_model.", "model.vision_tower.", "vision_tower.vision_model.", "vision_tower."),
    "projector": ("model.multi_modal_projector.", "multi_modal_projector."),
}
ARCHS = ("llama", "qwen2")  # llama.cpp architectures the language model is written as
QWEN2_BIASES = {"self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                "self_attn.v_proj.bias": "attn_v.bias"}
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
    modelfile: Path | None  # None where Ollama does not take the GGUF pair (Qwen2.5-VL)
    readme: Path
    seconds: float = 0.0
    image_tokens: tuple[int, int] | None = None  # llama.cpp's --image-min-tokens / --image-max-tokens (Qwen)


class Weights:
    """Names -> (file, key) over a directory's safetensors shards; tensors read one at a time as float32 numpy."""

    def __init__(self, model_dir: Path, prefixes: dict[str, tuple[str, ...]] | None = None):
        from ..convert import tensor_shapes

        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise UserError(f"{model_dir}: no safetensors weights; export reads safetensors only")
        self.where: dict[str, tuple[Path, str]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            for key, shape in tensor_shapes(f).items():  # a truncated or foreign file: one UserError naming it
                part, rest = _split(key, prefixes or PREFIXES)
                if part is not None:
                    self.where[f"{part}:{rest}"] = (f, key)
                    self.shapes[f"{part}:{rest}"] = shape

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> np.ndarray:
        import torch

        from ..weights import open_safetensors

        f, key = self.where[name]
        with open_safetensors(f) as h:
            return h.get_tensor(key).to(torch.float32).numpy()


def _split(key: str, table: dict[str, tuple[str, ...]]) -> tuple[str | None, str]:
    for part, prefixes in table.items():
        for p in prefixes:
            if key.startswith(p):
                return part, key[len(p):]
    return None, key


def check_exportable(cfg: dict, model_dir: Path) -> None:
    """Refuse, in one line each, what llama.cpp's LLaVA-1.5 path cannot represent."""
    text, vision = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    fix = ("; export covers LLaVA-1.5-shaped models (LLaMA or Qwen2 + CLIP + mlp2x_gelu), as Qilin-Med-VL and "
           "HuatuoGPT-Vision are")
    if text.get("model_type") not in ARCHS:
        raise UserError(f"{model_dir}: the LLM is '{text.get('model_type')}', and export writes llama.cpp's "
                        f"{' and '.join(ARCHS)} architectures only{fix}")
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
    if text.get("model_type") == "qwen2":  # q/k/v biases are Qwen2's own; its tokenizer is tokenizer.json
        if text.get("use_sliding_window"):
            raise UserError(f"{model_dir}: sliding-window attention is on; llama.cpp's qwen2 attends globally")
        return
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


def vision_kv(w, projector: str, cfg: dict, image_processor, *, image_size: int, depth: int, heads: int) -> None:
    """The mmproj keys every llama.cpp vision projector after LLaVA-1.5's reads (its type, the tower's shape, the
    LLM width it projects to, the processor's normalisation), as llama.cpp's own converter writes them."""
    import gguf

    v = cfg["vision_config"]
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(projector)
    w.add_vision_projection_dim(int(cfg["text_config"]["hidden_size"]))
    w.add_vision_image_size(int(image_size))
    w.add_vision_patch_size(int(v["patch_size"]))
    w.add_vision_embedding_length(int(v["hidden_size"]))
    w.add_vision_feed_forward_length(int(v["intermediate_size"]))
    w.add_vision_block_count(int(depth))
    w.add_vision_head_count(int(heads))
    w.add_vision_image_mean([float(x) for x in image_processor.image_mean])
    w.add_vision_image_std([float(x) for x in image_processor.image_std])


def write_gguf(path: Path, arch: str, kv, tensors: list[tuple[str, tuple[int, ...], callable]]) -> None:
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


def tokenizer_kv_spm(w, model_dir: Path, tok, vocab_rows: int, spm: Path | None = None) -> None:
    """SentencePiece metadata from `spm` (default: model_dir's tokenizer.model)."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((spm or model_dir / "tokenizer.model").read_bytes())
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


def write_llm(path: Path, model_dir: Path, cfg: dict, weights: Weights, tok, template, name: str, *,
              arch: str | None = None, extra_kv=None, layer_names: dict[str, str] | None = None) -> None:
    """The language model's GGUF: `arch` names llama.cpp's architecture where it is not the text config's
    model_type (Qwen2.5-VL's LLM is llama.cpp's qwen2vl), `extra_kv(writer)` adds what that architecture reads."""
    import gguf

    t = cfg["text_config"]
    arch = arch or t.get("model_type", "llama")
    bpe = arch in ("qwen2", "qwen2vl", "qwen3vl")  # Qwen's byte-level BPE and NEOX rotation
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
        if extra_kv:
            extra_kv(w)
        if bpe:  # the LLM's vocabulary decides the tokenizer metadata; the template, the chat template
            from .bpe_vocab import tokenizer_kv_bpe

            tokenizer_kv_bpe(w, model_dir, tok, vocab_rows)
        else:
            tokenizer_kv_spm(w, model_dir, tok, vocab_rows)
        w.add_chat_template(template.gguf_chat_template())

    def make(key: str, post=None):
        return lambda: post(weights.get(key)) if post else weights.get(key)

    tensors = []
    for src, dst in (("embed_tokens.weight", "token_embd.weight"), ("norm.weight", "output_norm.weight")):
        tensors.append((dst, weights.shapes[f"llm:{src}"], make(f"llm:{src}")))
    head = "head:weight" if weights.has("head:weight") else None
    if head:  # an absent head means tied embeddings: llama.cpp then reads token_embd
        tensors.append(("output.weight", weights.shapes[head], make(head)))
    # each layer's tensors: LLaMA's, Qwen2's q/k/v biases, or what the caller names (Qwen3's q/k norms, no biases)
    names = {**LLM_NAMES, **(layer_names if layer_names is not None else QWEN2_BIASES if bpe else {})}
    for i in range(t["num_hidden_layers"]):
        for src, dst in names.items():
            if src in ("embed_tokens.weight", "norm.weight"):
                continue
            key = f"llm:layers.{i}.{src}"
            if not weights.has(key):
                raise UserError(f"{model_dir}: tensor for layer {i} '{src}' missing; the weights are incomplete")
            post = None
            if bpe:
                pass  # llama.cpp's qwen2 uses the NEOX rotation, transformers' own layout: nothing to reorder
            elif src == "self_attn.q_proj.weight":
                post = lambda a: _permute(a, n_head)  # noqa: E731
            elif src == "self_attn.k_proj.weight":
                post = lambda a: _permute(a, n_kv)  # noqa: E731
            tensors.append((f"blk.{i}.{dst}", weights.shapes[key], make(key, post)))
    write_gguf(path, arch, kv, tensors)


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
    write_gguf(path, "clip", kv, tensors)
