"""Gemma 3 (MedGemma) as llama.cpp runs it: the LLM as llama.cpp's `gemma3` architecture and the SigLIP tower +
average-pooling projector as an mmproj of projector type `gemma3`, tensor names from the `gguf` package's own maps,
written with gguf.py's streaming writer.

What differs from the checkpoint's layout, as llama.cpp's own converter has it: Gemma's RMSNorms scale by
(1 + weight), llama.cpp's by weight, so every LLM norm and the projector's soft-embedding norm are written plus one;
the layers' sliding / full attention pattern is written per layer (llama.cpp's default is every sixth full) with
the sliding layers' RoPE base; the tokenizer is the release's SentencePiece `tokenizer.model` (no dummy prefix).
A checkpoint llama.cpp would run otherwise (an attention scale it computes differently, a Gemma tokenizer without
`tokenizer.model`) is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .gguf import Weights, tokenizer_kv_spm, vision_kv, write_gguf
from .templates import NOTICE

PREFIXES = {
    "vision": ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
               "vision_tower."),
    "projector": ("model.multi_modal_projector.", "multi_modal_projector."),
    "head": ("language_model.lm_head.", "lm_head."),
    "llm": ("model.language_model.", "language_model.model."),
}
LLM_LAYER = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm", "pre_feedforward_layernorm",
             "post_feedforward_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
VISION_LAYER = ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def is_gemma3(cfg: dict) -> bool:
    from ..families.gemma3 import GEMMA3

    return cfg.get("model_type") in GEMMA3.model_types


def _layer_types(t: dict) -> list[str]:
    n = int(t["num_hidden_layers"])
    types = t.get("layer_types")
    if types:
        return list(types)
    every = int(t.get("sliding_window_pattern") or 6)  # transformers' default for a config without layer_types
    return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]


def sentencepiece_file(dirs) -> Path | None:
    """The first of `dirs` (the merged model, the run, its base) holding the release's tokenizer.model: transformers
    5 saves a Gemma tokenizer as tokenizer.json only, so a merge may not carry it."""
    return next((Path(d) / "tokenizer.model" for d in dirs if d and (Path(d) / "tokenizer.model").is_file()), None)


def check_exportable(cfg: dict, model_dir: Path, tokenizer_dirs) -> None:
    t, v = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    fix = "; llama.cpp's Gemma 3 path cannot run this checkpoint as transformers does"
    head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
    scalar = t.get("query_pre_attn_scalar", head_dim)
    # llama.cpp scales queries by 1/sqrt(head_dim), or for 62-layer models (27B) 1/sqrt(hidden / heads)
    wants = t["hidden_size"] // t["num_attention_heads"] if t.get("num_hidden_layers") == 62 else head_dim
    if scalar != wants:
        raise UserError(f"{model_dir}: query_pre_attn_scalar {scalar}; llama.cpp scales queries by 1/sqrt({wants}){fix}")
    if t.get("final_logit_softcapping") or t.get("attn_logit_softcapping"):
        raise UserError(f"{model_dir}: logit soft-capping is set; Gemma 3 releases have none{fix}")
    if v.get("model_type", "siglip_vision_model") != "siglip_vision_model" or v.get("vision_use_head"):
        raise UserError(f"{model_dir}: the vision tower is not a headless SigLIP{fix}")
    rope = t.get("rope_parameters") or {}
    for kind in ("full_attention", "sliding_attention"):
        r = rope.get(kind, {})
        if r.get("rope_type", "default") not in ("default", "linear") or (
                kind == "sliding_attention" and r.get("rope_type", "default") != "default"):
            raise UserError(f"{model_dir}: {kind} RoPE '{r.get('rope_type')}'; llama.cpp takes linear scaling on the "
                            f"full-attention layers only{fix}")
    if sentencepiece_file(tokenizer_dirs) is None:
        raise UserError(f"{model_dir}: no SentencePiece tokenizer.model here or in its base; llama.cpp encodes Gemma "
                        "with Gemma's SentencePiece vocabulary (the releases ship it): copy the release's "
                        "tokenizer.model beside the model")


def write_llm(path: Path, model_dir: Path, cfg: dict, weights: Weights, tok, template, name: str,
              spm: Path) -> None:
    import gguf

    t = cfg["text_config"]
    n_layer, n_head = int(t["num_hidden_layers"]), int(t["num_attention_heads"])
    head_dim = int(t.get("head_dim") or t["hidden_size"] // n_head)
    rope = t.get("rope_parameters") or {}
    full, local = rope.get("full_attention", {}), rope.get("sliding_attention", {})
    vocab_rows = weights.shapes["llm:embed_tokens.weight"][0]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, n_layer)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA3]

    def kv(w):
        w.add_name(name)
        w.add_description(f"exported by qilin-lite from {model_dir.name}; {NOTICE}")
        w.add_context_length(int(t.get("max_position_embeddings", 131072)))
        w.add_embedding_length(int(t["hidden_size"]))
        w.add_block_count(n_layer)
        w.add_feed_forward_length(int(t["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(int(t.get("num_key_value_heads") or n_head))
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_layer_norm_rms_eps(float(t.get("rms_norm_eps", 1e-6)))
        w.add_rope_freq_base(float(full.get("rope_theta", t.get("rope_theta", 1000000.0))))
        if full.get("rope_type") == "linear":  # MedGemma-4B: factor 8 on the full-attention layers
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(full["factor"]))
        w.add_sliding_window(int(t["sliding_window"]))
        w.add_sliding_window_pattern([x == "sliding_attention" for x in _layer_types(t)])
        w.add_rope_freq_base_swa(float(local.get("rope_theta", t.get("rope_local_base_freq", 10000.0))))
        w.add_vocab_size(int(vocab_rows))
        w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
        tokenizer_kv_spm(w, model_dir, tok, vocab_rows, spm)
        w.add_chat_template(template.gguf_chat_template())

    def make(key: str, shift: bool):
        return (lambda: weights.get(key) + 1.0) if shift else (lambda: weights.get(key))

    def need(key: str) -> str:
        if not weights.has(key):
            raise UserError(f"{model_dir}: LLM tensor '{key.split(':', 1)[1]}' missing; the weights are incomplete")
        return key

    tensors = []
    for src in ("embed_tokens", "norm"):
        key = need(f"llm:{src}.weight")
        tensors.append((names.get_name(f"model.{src}") + ".weight", weights.shapes[key], make(key, src == "norm")))
    if weights.has("head:weight") and not cfg.get("tie_word_embeddings", True):
        tensors.append(("output.weight", weights.shapes["head:weight"], make("head:weight", False)))
    for i in range(n_layer):
        for src in LLM_LAYER:
            key = need(f"llm:layers.{i}.{src}.weight")
            dst = names.get_name(f"model.layers.{i}.{src}") + ".weight"
            tensors.append((dst, weights.shapes[key], make(key, src.endswith("norm"))))
    write_gguf(path, arch, kv, tensors)


def write_mmproj(path: Path, model_dir: Path, cfg: dict, weights: Weights, image_processor, name: str) -> None:
    import gguf

    v = cfg["vision_config"]
    depth, side = int(v["num_hidden_layers"]), int(v["image_size"]) // int(v["patch_size"])
    per_side = int(round(int(cfg.get("mm_tokens_per_image", 256)) ** 0.5))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(depth, 3))
    root = "vision_tower.vision_model."

    def kv(w):
        w.add_name(f"mmproj-{name}")
        w.add_description(f"SigLIP tower ({depth} blocks) + Gemma 3's pooling projector ({per_side * per_side} tokens "
                          f"an image at {v['image_size']} px), exported by qilin-lite. {NOTICE}")
        vision_kv(w, gguf.VisionProjectorType.GEMMA3, cfg, image_processor, image_size=int(v["image_size"]),
                  depth=depth, heads=int(v["num_attention_heads"]))
        w.add_vision_attention_layernorm_eps(float(v.get("layer_norm_eps", 1e-6)))
        w.add_vision_use_gelu(True)
        if side // per_side != 4:  # llama.cpp's default pooling is 4 x 4 (64 x 64 patches -> 256 tokens)
            w.add_vision_projector_scale_factor(side // per_side)

    def need(key: str) -> str:
        if not weights.has(key):
            raise UserError(f"{model_dir}: tensor '{key.split(':', 1)[1]}' missing; the weights are incomplete or "
                            "not a Gemma 3's")
        return key

    def add(key: str, dst: str, shift: bool = False):
        key = need(key)
        tensors.append((dst, weights.shapes[key], (lambda: weights.get(key) + 1.0) if shift else
                        (lambda: weights.get(key))))

    tensors: list = []
    for src in ("embeddings.patch_embedding", "embeddings.position_embedding"):
        dst = names.get_name(root + src)
        for kind in ("weight", "bias"):
            if kind == "weight" or weights.has(f"vision:{src}.{kind}"):
                add(f"vision:{src}.{kind}", f"{dst}.{kind}")
    for i in range(depth):
        for src in VISION_LAYER:
            dst = names.get_name(f"{root}encoder.layers.{i}.{src}")
            for kind in ("weight", "bias"):
                add(f"vision:encoder.layers.{i}.{src}.{kind}", f"{dst}.{kind}")
    for kind in ("weight", "bias"):
        add(f"vision:post_layernorm.{kind}", f"{names.get_name(root + 'post_layernorm')}.{kind}")
    add("projector:mm_input_projection_weight", names.get_name("multi_modal_projector.mm_input_projection") + ".weight")
    add("projector:mm_soft_emb_norm.weight", names.get_name("multi_modal_projector.mm_soft_emb_norm") + ".weight",
        shift=True)
    write_gguf(path, "clip", kv, tensors)


def readme(model: str, mmproj: str, name: str, image_size: int) -> str:
    return f"""# {name}: GGUF export (qilin-lite)

> {NOTICE}

Run on a CPU with llama.cpp (a build with Gemma 3 support, 2025 or later):

    qilin-lite image scan.dcm --model RUN --out scan.png   # windowed, at {image_size} x {image_size} as the processor makes it
    llama-mtmd-cli -m {model} --mmproj {mmproj} --jinja --image scan.png -p "这张图像显示了什么？" --temp 0
    llama-server -m {model} --mmproj {mmproj} --jinja --host 127.0.0.1

`--jinja` makes llama.cpp use the chat template inside {model} (the run's gemma3: each image where it stands, a
blank line on each side of it, the text trimmed as in training). Ollama: not written for Gemma 3 here (Ollama runs
it on its own engine: `ollama create` from a `qilin-lite merge` directory).
{model} is {'f16' if model.endswith('-f16.gguf') else 'quantized'}; the mmproj is f16.
"""
