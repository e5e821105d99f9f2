"""What the configs say: exact parameter counts per group (models built on the meta device, nothing
downloaded) and the shapes the activations need. The paper's models are written out so planning needs no download.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


GiB = 1024**3

# The paper's models, written out so that planning needs no download (values from their hub config.json files).
CLIP_VIT_L14_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
    patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
LLAMA2_13B = dict(
    hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
    vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
)
# Qwen2.5-7B-Instruct: 151,665 tokens in an embedding of 152,064 rows, so `<image>` takes a spare row (no resize)
QWEN2_5_7B = dict(
    model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
    tie_word_embeddings=False, hidden_act="silu", tokenizer_size=151665,
)
KNOWN_VISION = {"openai/clip-vit-large-patch14-336": CLIP_VIT_L14_336}
KNOWN_LLM = {
    "Qwen/Qwen2.5-7B-Instruct": QWEN2_5_7B,
    "FlagAlpha/Llama2-Chinese-13b-Chat": LLAMA2_13B,
    "meta-llama/Llama-2-13b-hf": LLAMA2_13B,
    "meta-llama/Llama-2-13b-chat-hf": LLAMA2_13B,
}


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
    q_dim: int = 0  # query heads x head dim where it is not the hidden size (Gemma 3: 8 x 256 in a 2560 model)
    image_note: str = ""  # how the image tokens were decided, where they follow the image's size
    # every decoder linear layer, as `linears`, where LoRA targets only some (Qwen-VL: q/k/v/o) but 4-bit quantizes all
    decoder_linears: tuple = ()

    @property
    def quantized(self) -> tuple:
        return self.decoder_linears or self.linears

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

    @property
    def query_dim(self) -> int:
        return self.q_dim or self.hidden

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

    from ..model import num_image_tokens
    from ..train.stages import LORA_TARGETS

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
    """Two plain config dicts -> the LlavaConfig `assemble_base` would write (the LLM gains the `<image>` token: a
    new embedding row, or a spare one where the vocabulary is padded beyond the tokenizer, as Qwen2's is)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config

    vc = CLIPVisionConfig(**vision)
    llm = dict(llm)
    kind, tokens = llm.pop("model_type", "llama"), llm.pop("tokenizer_size", llm["vocab_size"])
    rows = max(llm["vocab_size"], tokens + 1)
    tc = (Qwen2Config if kind == "qwen2" else LlamaConfig)(**{**llm, "vocab_size": rows})
    return LlavaConfig(
        vision_config=vc, text_config=tc, image_token_id=tokens,
        projector_hidden_act="gelu" if projector == "mlp2x_gelu" else "linear",
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default",
        image_seq_length=(vc.image_size // vc.patch_size) ** 2, tie_word_embeddings=llm.get("tie_word_embeddings", False),
    )
