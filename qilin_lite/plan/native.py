"""The planner's shapes for the families that load in their own transformers class (Qwen2.5-VL, Gemma 3 / MedGemma):
exact parameter counts of that class built on the meta device, grouped by the family's own module paths, and the
image tokens an image of a given size becomes, by the model's own resize rule.

In:  a config (a hub id the planner knows by heart, a local directory, or a hub id already in the local cache), the
     family's data bounds (`data.min_pixels` / `data.max_pixels`) and the image size to plan for.
Out: a `Shape` whose `image_tokens` is what that image becomes in the LLM's sequence (native resolution: one token
     per merged patch, e.g. 1,369 for a 1024 px X-ray unbounded, 576 under Lingshu's recipe bound; Gemma 3: its
     256 soft tokens whatever the size) and whose `vision_tokens` is the patches the tower runs on for it.
"""

from __future__ import annotations

import re

from ..errors import UserError
from .shapes import Shape

# Released configs written out so planning needs no download (values from the hub's config.json files).
QWEN2_5_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                         fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_channels=3)
QWEN2_5_VL_7B = dict(
    model_type="qwen2_5_vl",
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, hidden_act="silu"),
    vision_config={**QWEN2_5_VL_VISION, "out_hidden_size": 3584},
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False,
)
QWEN2_5_VL_32B = dict(
    QWEN2_5_VL_7B,
    text_config=dict(QWEN2_5_VL_7B["text_config"], hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                     num_attention_heads=40, num_key_value_heads=8),
    vision_config={**QWEN2_5_VL_VISION, "out_hidden_size": 5120},
)
# the Qwen2.5-VL releases' preprocessor_config.json bounds (the processor class's own defaults are tighter)
QWEN2_5_VL_PIXELS = (3136, 12845056)
SIGLIP_896 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  image_size=896, patch_size=14, vision_use_head=False)
GEMMA3_4B = dict(
    model_type="gemma3",
    text_config=dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                     num_key_value_heads=4, head_dim=256, vocab_size=262208, sliding_window=1024,
                     query_pre_attn_scalar=256, max_position_embeddings=131072, rms_norm_eps=1e-6),
    vision_config=SIGLIP_896, mm_tokens_per_image=256, boi_token_index=255999, eoi_token_index=256000,
    image_token_index=262144,
)
GEMMA3_27B = dict(
    GEMMA3_4B,
    text_config=dict(GEMMA3_4B["text_config"], hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
                     num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168),
)
KNOWN_NATIVE = {
    "Qwen/Qwen2.5-VL-7B-Instruct": QWEN2_5_VL_7B,
    "lingshu-medical-mllm/Lingshu-7B": QWEN2_5_VL_7B,
    "FreedomIntelligence/HuatuoGPT-Vision-7B-Qwen2.5VL": QWEN2_5_VL_7B,
    "Qwen/Qwen2.5-VL-32B-Instruct": QWEN2_5_VL_32B,
    "lingshu-medical-mllm/Lingshu-32B": QWEN2_5_VL_32B,
    "google/medgemma-4b-it": GEMMA3_4B,
    "google/medgemma-4b-pt": GEMMA3_4B,
    "google/gemma-3-4b-it": GEMMA3_4B,
    "google/medgemma-27b-it": GEMMA3_27B,
    "google/gemma-3-27b-it": GEMMA3_27B,
}


def native_config(cfg: dict):
    """config.json's dict (or one of the above) -> the transformers config of its own class."""
    from transformers import CONFIG_MAPPING

    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "auto_map")}
    kind = cfg.pop("model_type", None)
    if kind not in CONFIG_MAPPING:
        raise UserError(f"model_type {kind!r} is not a class this transformers knows; update transformers")
    return CONFIG_MAPPING[kind](**cfg)


def release_pixels(source: str | None) -> tuple[int, int]:
    """The (min, max) pixels a model's own processor bounds images to: a local directory's preprocessor_config.json
    (the Qwen processors' min_pixels / max_pixels, or size's shortest / longest edge), else the releases' defaults."""
    import json
    from pathlib import Path

    f = Path(source) / "preprocessor_config.json" if source else None
    if f is None or not f.is_file():
        return QWEN2_5_VL_PIXELS
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{f}: not readable JSON ({e}); repair or remove it") from None
    size = cfg.get("size") or {}
    lo = cfg.get("min_pixels") or size.get("shortest_edge") or QWEN2_5_VL_PIXELS[0]
    hi = cfg.get("max_pixels") or size.get("longest_edge") or QWEN2_5_VL_PIXELS[1]
    return int(lo), int(hi)


def image_hw(text: str | None) -> tuple[int, int] | None:
    """'1024' -> (1024, 1024); '1024x768' (width x height) -> (768, 1024) as (height, width); None -> None."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x×*]\s*(\d+))?\s*", str(text))
    if not m or int(m.group(1)) < 1 or (m.group(2) and int(m.group(2)) < 1):
        raise UserError(f"--image-size '{text}': write the image's pixels as 1024 (square) or WIDTHxHEIGHT, e.g. 1024x768")
    w = int(m.group(1))
    h = int(m.group(2) or w)
    if w * h > 2**31:
        raise UserError(f"--image-size '{text}': {w} x {h} pixels is beyond any image a processor takes")
    return h, w


def image_tokens(config, family, hw: tuple[int, int] | None, pixels: tuple[int | None, int | None]) -> tuple[int, int, str]:
    """(tokens in the LLM's sequence, patches the tower runs on, how that was decided) for one image."""
    vc = config.vision_config
    if family.image_mode != "native":
        n = family.tokens_per_image(config)
        side = vc.image_size // vc.patch_size
        return n, side * side, f"{vc.image_size} px, as every image is resized"
    merge, patch = vc.spatial_merge_size, vc.patch_size
    lo, hi = pixels
    if hw is None:  # the largest image the bound lets through: what a long-edged X-ray comes to
        h = w = int((hi ** 0.5) // (patch * merge)) * patch * merge
        patches = (h // patch) * (w // patch)
        how = f"the largest image data.max_pixels {hi} lets through ({w} x {h} px)"
    else:
        # the processor's own count (its resize rule within the bounds), through its public method
        from transformers import Qwen2VLImageProcessorPil

        counter = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=merge,
                                           size={"shortest_edge": lo, "longest_edge": hi})
        patches = counter.get_number_of_image_patches(hw[0], hw[1], {})
        how = (f"a {hw[1]} x {hw[0]} px image, resized by its processor to {patches} patches of {patch} px "
               f"within pixels {lo}-{hi}")
    return patches // merge**2, patches, how


def native_shape(config, family, hw=None, pixels=QWEN2_5_VL_PIXELS) -> tuple[Shape, str]:
    """The config's own class on the meta device -> (`Shape`, how the image tokens were decided)."""
    import torch
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, family.model_class)(config)
    params = dict(model.named_parameters())  # tied weights once

    def under(prefix: str) -> int:
        return sum(p.numel() for n, p in params.items() if n.startswith(prefix + "."))

    projector = under(family.projector)
    vision = under(family.vision) - (projector if family.projector.startswith(family.vision + ".") else 0)
    lm = model.get_submodule(family.llm)
    every = [(name, mod.in_features, mod.out_features, mod.bias is not None) for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.Linear) and name.startswith(family.llm + ".layers.")]
    decoder_linear = sum(i * o + (o if bias else 0) for _, i, o, bias in every)
    linears = [t for t in every if re.fullmatch(family.lora_targets, t[0])]
    layers = sum(p.numel() for p in lm.layers.parameters())
    tied = model.lm_head.weight is lm.embed_tokens.weight
    tc, vc = config.get_text_config(), config.vision_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    tokens, patches, how = image_tokens(config, family, hw, pixels)
    shape = Shape(
        vision=vision, projector=projector, decoder_linear=decoder_linear, decoder_other=layers - decoder_linear,
        embeddings=sum(p.numel() for p in lm.embed_tokens.parameters()), final_norm=sum(p.numel() for p in lm.norm.parameters()),
        lm_head=0 if tied else model.lm_head.weight.numel(), linears=tuple(linears), hidden=tc.hidden_size,
        intermediate=tc.intermediate_size, layers=tc.num_hidden_layers, heads=tc.num_attention_heads,
        kv_dim=(tc.num_key_value_heads or tc.num_attention_heads) * head_dim, head_dim=head_dim, vocab=tc.vocab_size,
        vision_hidden=vc.hidden_size, vision_intermediate=vc.intermediate_size, vision_tokens=patches,
        image_tokens=tokens, image_size=getattr(vc, "image_size", 0),
        # Gemma 3's projector is one matrix (after pooling); Qwen's merger an MLP of two linear layers
        linear_projector=sum(isinstance(m, torch.nn.Linear) for m in model.get_submodule(family.projector).modules()) < 2,
        q_dim=tc.num_attention_heads * head_dim, decoder_linears=tuple(every),
    )
    assert shape.total == sum(p.numel() for p in params.values()), "parameter groups do not add up to the model"
    return shape, how
