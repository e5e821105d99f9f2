"""GGUF tokenizer metadata for a byte-level BPE LLM (Qwen2: HuatuoGPT-Vision, ChatML runs), as llama.cpp's own
converter writes it: `gpt2` model, `qwen2` pre-tokenizer, the vocabulary's byte-level strings, merges, added special
tokens as CONTROL, padding rows UNUSED, no BOS.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def tokenizer_kv_bpe(w, model_dir: Path, tok, vocab_rows: int) -> None:
    import gguf

    f = model_dir / "tokenizer.json"
    if not f.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json; a Qwen2 model's tokenizer is exported from it")
    data = json.loads(f.read_text(encoding="utf-8"))
    if data.get("model", {}).get("type") != "BPE":
        raise UserError(f"{model_dir}: tokenizer.json is not a BPE tokenizer; Qwen2's is")
    vocab = tok.get_vocab()
    added = tok.added_tokens_decoder  # id -> AddedToken
    if max(vocab.values()) >= vocab_rows:
        raise UserError(f"{model_dir}: the tokenizer has ids past the model's {vocab_rows} embedding rows; the "
                        "tokenizer does not belong to these weights")
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for setter, tid in ((w.add_eos_token_id, tok.eos_token_id), (w.add_pad_token_id, tok.pad_token_id)):
        if tid is not None:
            setter(int(tid))
    if tok.bos_token_id is not None:
        w.add_bos_token_id(int(tok.bos_token_id))
    w.add_add_bos_token(False)  # Qwen2 prompts start without one, as training's did
