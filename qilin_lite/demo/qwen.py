"""A tiny stand-in for a Qwen2 chat LLM (Qwen2-7B / Qwen2.5-7B-Instruct), built offline like the LLaMA one.

In:  demo texts and questions, a `TinySpec`.
Out: a directory laid out as Qwen2 checkpoints ship: `Qwen2ForCausalLM` weights (q/k/v biases, grouped KV heads) and
     a `tokenizer.json` with Qwen2's rules: byte-level BPE after Qwen2's pre-tokenizer split, NFC, no BOS, the three
     special tokens `<|endoftext|>` (end and padding), `<|im_start|>`, `<|im_end|>` right after the vocabulary, so
     ids and merges behave as the real vocabulary's do on the same text (the real one is checked by hand:
     tests/test_qwen_vocab.py).
"""

from __future__ import annotations

import json
from pathlib import Path

# Qwen2's pre-tokenizer split (its tokenizer.json): contractions, letters with one leading non-letter, single
# digits, punctuation runs with their newlines, newline runs, other whitespace
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
QWEN2_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_qwen_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 600, eos: str = "<|endoftext|>",
                         special: tuple[str, ...] = QWEN2_SPECIAL):
    """A byte-level BPE with Qwen2's pre-tokenizer, saved as Qwen2 saves it (Qwen2Tokenizer, no BOS). `eos`:
    `<|endoftext|>` as Qwen2-7B (and HuatuoGPT-Vision-7B) ship it, `<|im_end|>` as the Instruct models do.
    `special`: the added tokens, in Qwen's order right after the vocabulary (Qwen2.5-VL adds its vision tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(list(special))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    _merges_as_strings(out_dir / "tokenizer.json")
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in special}
    cfg = {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "bos_token": None,
           "eos_token": eos, "pad_token": "<|endoftext|>", "unk_token": None, "add_prefix_space": False,
           "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 32768,
           "split_special_tokens": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    from ..model import load_tokenizer

    return load_tokenizer(str(out_dir))


def _merges_as_strings(path: Path) -> None:
    """Merges written `"a b"`, as Qwen2's own tokenizer.json has them: tokenizers before 0.20 (what transformers
    4.40, HuatuoGPT-Vision's version, runs with) read only that form. Byte-level tokens hold no spaces."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def build_tiny_qwen2(llm_dir: Path, texts: list[str], questions, spec) -> None:
    """Tokenizer + a tiny Qwen2ForCausalLM pre-trained on the demo text and ChatML dialogs (an Instruct model)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ..families import TEMPLATES
    from .pretraining import chat_texts, pretrain

    dialogs = chat_texts({"questions": questions}, n=2000, seed=spec.seed, template="chatml")
    corpus = texts + dialogs
    tok = train_qwen_tokenizer(corpus + [TEMPLATES["chatml"].system], llm_dir, spec.vocab_size, eos="<|im_end|>")
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=spec.hidden, intermediate_size=spec.hidden * 2,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=max(1, spec.heads // 2),
        max_position_embeddings=1024, bos_token_id=None, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
        use_sliding_window=False,
    )
    lm = Qwen2ForCausalLM(cfg)
    pretrain(lm, tok, corpus, steps=spec.pretrain_steps, seed=spec.seed)
    lm.save_pretrained(llm_dir)
