"""A tiny stand-in for a Gemma 3 release (google/medgemma-4b-it, google/gemma-3-4b-it), built offline from config.

In:  texts to train the tokenizer on, an output directory, sizes.
Out: a directory laid out as the hub's Gemma 3 releases are: `Gemma3ForConditionalGeneration` weights and config
     (a SigLIP tower, the average-pooling projector, a Gemma 3 LLM with sliding and full attention layers), a
     tokenizer in Gemma's SentencePiece style (BPE with byte fallback, spaces as `▁`, `<pad>` `<eos>` `<bos>` `<unk>` as
     ids 0-3, BOS added, the turn and image tokens as added special tokens, `boi_token` / `eoi_token` /
     `image_token` named as Gemma3Processor reads them), the image processor at the tower's size and the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

GEMMA_BASE = ("<pad>", "<eos>", "<bos>", "<unk>")
GEMMA_ADDED = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>")


def train_gemma_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 700):
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")  # SentencePiece's space, no pre-tokenizer: merges cross words
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(GEMMA_BASE) + byte_pieces,
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(list(GEMMA_ADDED))
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bos)])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
           "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 131072,
           "clean_up_tokenization_spaces": False, "padding_side": "left",
           "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                    "image_token": "<image_soft_token>"}}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    from ..model import load_tokenizer

    return load_tokenizer(str(out_dir))


def train_gemma_sentencepiece(texts: list[str], out_dir: Path, vocab_size: int = 700):
    """Gemma's tokenizer as the releases ship it beside tokenizer.json: a SentencePiece `tokenizer.model` (BPE, byte
    fallback, no dummy prefix, `<pad>` `<eos>` `<bos>` `<unk>` as ids 0-3, the turn and image tokens as user-defined
    pieces). What `export gguf` reads for Gemma 3, as llama.cpp's converter does."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, split_by_whitespace=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=list(GEMMA_ADDED), character_coverage=1.0, num_threads=1, minloglevel=2,
        hard_vocab_limit=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    cfg = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
           "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 131072,
           "clean_up_tokenization_spaces": False, "padding_side": "left",
           "additional_special_tokens": list(GEMMA_ADDED),
           "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                    "image_token": "<image_soft_token>"}}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    from ..model import load_tokenizer

    return load_tokenizer(str(out_dir))


def build_tiny_gemma3(out_dir: Path, texts: list[str], *, hidden: int = 64, layers: int = 2, vocab_size: int = 700,
                      image_size: int = 28, tokens_per_image: int = 4, seed: int = 0,
                      sentencepiece: bool = False) -> Path:
    """Write a tiny Gemma 3 directory (random weights) and return it: `tokens_per_image` soft tokens an image (256 in
    the releases), images squashed to `image_size` px (896). `sentencepiece`: the tokenizer as a `tokenizer.model`
    (what GGUF export reads) rather than a tokenizer.json alone."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from ..families import get_template

    out_dir = Path(out_dir)
    template = get_template("gemma3")
    train = train_gemma_sentencepiece if sentencepiece else train_gemma_tokenizer
    tok = train(list(texts) + ["user\n", "model\n", "\n\n"] * 20, out_dir, vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA_BASE + GEMMA_ADDED}
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                         sliding_window=8, max_position_embeddings=2048, query_pre_attn_scalar=hidden // 2,
                         layer_types=(["sliding_attention"] * (layers - 1) + ["full_attention"]),
                         pad_token_id=ids["<pad>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
                         bos_token_id=ids["<bos>"]),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=image_size, patch_size=7, vision_use_head=False),
        mm_tokens_per_image=tokens_per_image, boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"],
        pad_token_id=ids["<pad>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]], bos_token_id=ids["<bos>"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.save_pretrained(out_dir)
    ip = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3, resample=2)
    ip.save_pretrained(out_dir)
    tok.chat_template = template.chat_template_jinja()
    tok.save_pretrained(out_dir)
    return out_dir
