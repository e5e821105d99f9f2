"""A small Llava built from config, and LLaVA-format records whose token lengths follow ChiMed-VL's statistics.

In:  a `ModelSize`, a number of records per stage, a seed, an output folder.
Out: `base/` (a Llava directory written by the real `assemble_base` from a CLIP vision encoder and a LLaMA LLM built
     from config, tokenizer trained locally), `images/*.png` (tiny grey images), `align.json` and `tune.json`
     (LLaVA records: stage 1 a caption or context per image, stage 2 one question and answer per image) whose text
     lengths, counted by that tokenizer, are drawn from `lengths.py`'s fits to the published statistics.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .lengths import align_text_lengths, tune_text_lengths


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 256  # LLM hidden size; the MLP is 2x (TinySpec's rule)
    layers: int = 4
    heads: int = 4
    image_size: int = 64  # with patch 8: 64 image tokens per sample (the real model has 576)
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2


def build_base(out: Path, size: ModelSize, seed: int = 0) -> Path:
    """Llava directory for the benchmarks (reused when already built with the same size)."""
    from qilin_lite.demo.base import TinySpec, build_tiny_base
    from qilin_lite.demo.data import CHOICES, QUESTIONS, DemoDataSpec, demo_texts
    from qilin_lite.model import assemble_base

    out = Path(out)
    stamp = out / "size.json"
    base = out / "base"
    if stamp.exists() and json.loads(stamp.read_text()) == asdict(size) and (base / "config.json").exists():
        return base
    spec = DemoDataSpec(image_size=size.image_size)
    questions = [(q, list(CHOICES[t])) for t in spec.tasks for q in QUESTIONS[t]]
    tiny = TinySpec(
        image_size=size.image_size, patch_size=size.patch_size, vision_hidden=size.vision_hidden,
        vision_layers=size.vision_layers, hidden=size.hidden, layers=size.layers, heads=size.heads,
        pretrain_steps=2, seed=seed,  # speed, not accuracy, is measured: the weights only need to be finite
    )
    vision, llm = build_tiny_base(out / "parts", demo_texts(spec), questions, tiny)
    assemble_base(str(vision), str(llm), base, dtype="float32", seed=seed)
    stamp.write_text(json.dumps(asdict(size)))
    return base


class TextMaker:
    """Random text of an exact token count: random characters of the tokenizer's alphabet, cut at a token edge."""

    def __init__(self, tokenizer, rng: np.random.Generator):
        vocab = tokenizer.get_vocab()
        # single CJK characters of the vocabulary: every one is its own token when no merge applies
        self.chars = sorted(c for c in vocab if len(c) == 1 and "\u4e00" <= c <= "\u9fff")
        if len(self.chars) < 20:
            raise RuntimeError(f"tokenizer has only {len(self.chars)} CJK characters")
        self.tok, self.rng = tokenizer, rng

    def __call__(self, n_tokens: int) -> str:
        text = "".join(self.rng.choice(self.chars, size=int(n_tokens * 1.6) + 8))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        while len(enc["input_ids"]) < n_tokens:  # merges shortened it too much: add more characters
            text += "".join(self.rng.choice(self.chars, size=n_tokens))
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return text[: enc["offset_mapping"][n_tokens - 1][1]]


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        name = f"img_{i:04d}.png"
        if not (folder / name).exists():
            grey = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
            Image.fromarray(grey, mode="L").save(folder / name)
        names.append(name)
    return names


def write_records(out: Path, tokenizer, n: int, image_size: int, seed: int = 0, n_images: int = 64) -> dict:
    """`align.json` and `tune.json` with `n` records each; records cycle through `n_images` image files."""
    out = Path(out)
    images = write_images(out / "images", n_images, image_size, seed)
    rng = np.random.default_rng(seed)
    make = TextMaker(tokenizer, rng)
    align_len = align_text_lengths(rng, n)
    q_len, a_len = tune_text_lengths(rng, n)
    align = [
        {"id": f"a{i}", "image": images[i % len(images)],
         "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": make(k)}]}
        for i, k in enumerate(align_len)
    ]
    tune = [
        {"id": f"t{i}", "image": images[i % len(images)],
         "conversations": [{"from": "human", "value": "<image>\n" + make(q)}, {"from": "gpt", "value": make(a)}]}
        for i, (q, a) in enumerate(zip(q_len, a_len))
    ]
    paths = {"images": out / "images", "align": out / "align.json", "tune": out / "tune.json"}
    paths["align"].write_text(json.dumps(align, ensure_ascii=False), encoding="utf-8")
    paths["tune"].write_text(json.dumps(tune, ensure_ascii=False), encoding="utf-8")
    return paths
