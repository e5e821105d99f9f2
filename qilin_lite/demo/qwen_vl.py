"""Tiny stand-ins for the native Qwen-VL releases, built offline from config: Qwen2.5-VL (Qwen2.5-VL-7B-Instruct,
Lingshu-7B) and Qwen3-VL (Qwen3-VL-8B-Instruct).

In:  texts to train the tokenizer on, an output directory, sizes.
Out: a directory laid out as the hub's releases are: `Qwen2_5_VLForConditionalGeneration` or
     `Qwen3VLForConditionalGeneration` weights and config, a Qwen2-style byte-level BPE `tokenizer.json` with Qwen's
     special tokens in Qwen's order (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, then the vision tokens; Qwen3-VL's
     also the plain added tokens after them, `<think>` among them), the `Qwen2VLImageProcessor` settings
     (`preprocessor_config.json`: 14 px patches for Qwen2.5-VL, 16 px and a 0.5 mean / std for Qwen3-VL; min / max
     pixels small so tests stay fast) and the model's chat template. Every command loads them as it loads
     `Qwen/Qwen2.5-VL-7B-Instruct` or `Qwen/Qwen3-VL-8B-Instruct`.
"""

from __future__ import annotations

from pathlib import Path

from .qwen import QWEN2_SPECIAL, train_qwen_tokenizer

QWEN_VL_SPECIAL = QWEN2_SPECIAL + ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                                   "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                                   "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# Qwen3's tokenizer.json adds these after the vision tokens as plain (not special) added tokens: a typed one is still
# one token, as in the real vocabulary
QWEN3_ADDED = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>")


def _mrope_section(head_dim: int) -> list[int]:
    """Each head's rotary half-dimensions over (time, height, width) in Qwen's proportions (16/24/24 of 64)."""
    half = head_dim // 2
    return [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]


def _tokenizer(out_dir: Path, texts: list[str], template: str, vocab_size: int, added: tuple[str, ...] = ()):
    from ..families import get_template

    t = get_template(template)
    # the role names as the template writes them (after <|im_start|>, no space before): one token each, as in
    # Qwen's vocabulary, where qwen-vl-finetune finds replies by the id of `assistant`
    corpus = list(texts) + [t.system, "system\n", "user\n", "assistant\n"] * 20
    tok = train_qwen_tokenizer(corpus, out_dir, vocab_size, eos="<|im_end|>", special=QWEN_VL_SPECIAL)
    if added:
        tok.add_tokens(list(added))
    tok.chat_template = t.chat_template_jinja()
    return tok, {x: tok.convert_tokens_to_ids(x) for x in QWEN_VL_SPECIAL}


def _save(model, tok, image_processor, ids: dict, out_dir: Path) -> Path:
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def build_tiny_qwen2_5_vl(out_dir: Path, texts: list[str], *, hidden: int = 64, layers: int = 2, heads: int = 2,
                          vocab_size: int = 700, vision_hidden: int = 32,
                          min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 64, window_size: int = 56,
                          seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-VL directory (random weights) and return it. With the default pixels an image becomes
    4 to 64 tokens (56 px to 224 px a side). `window_size` 112 is the releases' (and the only one llama.cpp runs);
    56 puts several windows in the tiny images."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out_dir = Path(out_dir)
    tok, ids = _tokenizer(out_dir, texts, "qwen2-vl", vocab_size)
    section = _mrope_section(hidden // heads)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1000000.0},
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_heads=2,
                           out_hidden_size=hidden, fullatt_block_indexes=[1], window_size=window_size, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    return _save(model, tok, Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels), ids, out_dir)


def build_tiny_qwen3_vl(out_dir: Path, texts: list[str], *, hidden: int = 64, layers: int = 2, heads: int = 2,
                        vocab_size: int = 700,
                        min_pixels: int = 32 * 32 * 4, max_pixels: int = 32 * 32 * 64, seed: int = 0) -> Path:
    """Write a tiny Qwen3-VL directory (random weights) and return it. With the default pixels an image becomes
    4 to 64 tokens (64 px to 256 px a side). Its vision tower has DeepStack as the releases do (one merger, after
    the first vision block, feeding the first LLM layer) and the text model interleaved M-RoPE."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out_dir = Path(out_dir)
    tok, ids = _tokenizer(out_dir, texts, "qwen3-vl", vocab_size, QWEN3_ADDED)
    head_dim = hidden // heads
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=1, head_dim=head_dim, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": _mrope_section(head_dim),
                             "mrope_interleaved": True, "rope_theta": 5000000.0},
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256,
                           deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    # the releases' preprocessor_config.json: 16 px patches, merge 2, mean and std 0.5
    ip = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5, 0.5, 0.5],
                                  image_std=[0.5, 0.5, 0.5], min_pixels=min_pixels, max_pixels=max_pixels)
    return _save(model, tok, ip, ids, out_dir)
