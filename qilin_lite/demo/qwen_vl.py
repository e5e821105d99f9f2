"""A tiny stand-in for a Qwen2.5-VL release (Qwen2.5-VL-7B-Instruct, Lingshu-7B), built offline from config.

In:  texts to train the tokenizer on, an output directory, sizes.
Out: a directory laid out as the hub's Qwen2.5-VL releases are: `Qwen2_5_VLForConditionalGeneration` weights and
     config, a Qwen2-style byte-level BPE `tokenizer.json` with Qwen's special tokens in Qwen's order
     (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, then the vision tokens), the `Qwen2VLImageProcessor` settings
     (`preprocessor_config.json`, min / max pixels small so tests stay fast) and the model's chat template. Every
     command loads it as it loads `Qwen/Qwen2.5-VL-7B-Instruct`.
"""

from __future__ import annotations

from pathlib import Path

from .qwen import QWEN2_SPECIAL, train_qwen_tokenizer

QWEN_VL_SPECIAL = QWEN2_SPECIAL + ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                                   "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                                   "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def build_tiny_qwen2_5_vl(out_dir: Path, texts: list[str], *, hidden: int = 64, layers: int = 2, heads: int = 2,
                          vocab_size: int = 700,
                          min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 64, seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-VL directory (random weights) and return it. With the default pixels an image becomes
    4 to 64 tokens (56 px to 224 px a side)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..families import get_template

    out_dir = Path(out_dir)
    template = get_template("qwen2-vl")
    # the role names as the template writes them (after <|im_start|>, no space before): one token each, as in
    # Qwen's vocabulary, where qwen-vl-finetune finds replies by the id of `assistant`
    corpus = list(texts) + [template.system, "system\n", "user\n", "assistant\n"] * 20
    tok = train_qwen_tokenizer(corpus, out_dir, vocab_size, eos="<|im_end|>", special=QWEN_VL_SPECIAL)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIAL}
    head_dim = hidden // heads
    # mrope splits each head's rotary half-dimensions over (time, height, width): 1/4, 3/8, 3/8 as Qwen's 16/24/24
    half = head_dim // 2
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1000000.0},
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out_dir)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    image_processor.save_pretrained(out_dir)
    tok.chat_template = template.chat_template_jinja()
    tok.save_pretrained(out_dir)
    return out_dir
