"""A tiny stand-in for CLIP ViT-L/14-336 and LLaMA-2 13B, built offline so the demo and the tests need no hub.

In:  the demo texts (captions, questions, answers) and a size.
Out: two directories laid out exactly like hub checkpoints (`vision/`: a CLIPVisionModel + image processor;
     `llm/`: a LlamaForCausalLM + tokenizer), which then go through the same `assemble_base` users hit with hub ids.

The tokenizer is trained on the demo text, `<unk>`/`<s>`/`</s>` at ids 0-2, BOS prepended: either LLaMA's own kind
(a SentencePiece `tokenizer.model` with byte fallback, what the demo uses: it takes the authors' encoding path and
llama.cpp encodes it, so `export gguf` works on the demo) or a `tokenizer.json` BPE with Metaspace (the tests' default:
it covers the fast-tokenizer path that non-LLaMA LLMs take). A real base LLM already knows its language, so the
tiny LLM gets a short language pre-training (pretraining.py) on the demo text and on text-only dialogs in the chat
format whose answers are drawn at random: it learns the language and the format, but nothing about images, so
accuracy before tuning stays at chance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..families import TEMPLATES
from .pretraining import chat_texts, pretrain
from .qwen import build_tiny_qwen2


@dataclass
class TinySpec:
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    vocab_size: int = 600
    pretrain_steps: int = 300
    seed: int = 0
    tokenizer: str = "bpe"  # bpe (tokenizer.json) | sentencepiece (tokenizer.model, as LLaMA-2 ships it)
    llm: str = "llama"  # llama | qwen2 (Qwen2ForCausalLM + a byte-level BPE with Qwen2's rules: demo/qwen.py)


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    # every character seen (and the newline LLaVA puts after <image>) is in the vocabulary: no <unk>
    alphabet = sorted({c for t in texts for c in t} | {"\n"})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], min_frequency=2, initial_alphabet=alphabet
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast


def train_sentencepiece(texts: list[str], out_dir: Path, vocab_size: int = 600, legacy: bool | None = None,
                        character_coverage: float = 0.98):
    """A SentencePiece `tokenizer.model` trained with LLaMA's settings (BPE, byte fallback, dummy prefix space,
    digits split, no normalisation), saved as LLaMA checkpoints ship it: `tokenizer.model` + a config and no
    `tokenizer.json`. `legacy=None` leaves the key out, as many LLaMA fine-tunes do (transformers 4.31 read that as
    true). Lets tests and users' checks exercise the authors' slow-tokenizer encoding without LLaMA's own file."""
    import io
    import json

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, split_by_unicode_script=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=character_coverage, num_threads=1, minloglevel=2,
        hard_vocab_limit=False,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if legacy is not None:
        cfg["legacy"] = legacy
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    from ..model import load_tokenizer

    return load_tokenizer(str(out_dir))


def build_tiny_base(out_dir: Path, texts: list[str], questions: list[tuple[str, list[str]]], spec: TinySpec = TinySpec()):
    """Write `out_dir/vision` and `out_dir/llm`; return their paths."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    try:  # the PIL processor by name: `CLIPImageProcessor` means the torchvision one, and warns without torchvision
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # transformers before the backend split
        from transformers import CLIPImageProcessor

    torch.manual_seed(spec.seed)
    out_dir = Path(out_dir)
    vision_dir, llm_dir = out_dir / "vision", out_dir / "llm"
    vcfg = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2, num_hidden_layers=spec.vision_layers,
        num_attention_heads=4, image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_hidden,
    )
    vision = CLIPVisionModel(vcfg)
    # A trained CLIP's patch features say where each patch is; a random one's barely do (position embeddings start
    # at std 0.02). Larger random position embeddings give the stand-in that property, so "which side" is learnable.
    with torch.no_grad():
        vision.embeddings.position_embedding.weight.normal_(0.0, 0.3)
    vision.save_pretrained(vision_dir)
    CLIPImageProcessor(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size}
    ).save_pretrained(vision_dir)

    if spec.llm == "qwen2":
        build_tiny_qwen2(llm_dir, texts, questions, spec)
        return vision_dir, llm_dir
    dialogs = chat_texts({"questions": questions}, n=2000, seed=spec.seed)
    corpus = texts + dialogs
    if spec.tokenizer == "sentencepiece":
        # every character of the demo's small corpus gets a piece (byte fallback stays for anything else), as
        # LLaMA's vocabulary has the common characters: no question spelled out in raw bytes
        tok = train_sentencepiece(corpus + [TEMPLATES["vicuna_v1"].system], llm_dir, spec.vocab_size,
                                  character_coverage=1.0)
    elif spec.tokenizer == "bpe":
        tok = train_tokenizer(corpus + [TEMPLATES["vicuna_v1"].system], llm_dir, spec.vocab_size)
    else:
        raise ValueError(f"TinySpec.tokenizer: {spec.tokenizer!r} (bpe | sentencepiece)")
    lcfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=spec.hidden, intermediate_size=spec.hidden * 2, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.heads, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    lm = LlamaForCausalLM(lcfg)
    pretrain(lm, tok, corpus, steps=spec.pretrain_steps, seed=spec.seed)
    lm.save_pretrained(llm_dir)
    return vision_dir, llm_dir
