"""The demo's tiny base for the families that load in their own class (`qilin-lite demo --family qwen2.5-vl`): a
Qwen2.5-VL release stand-in (demo/qwen_vl.py) whose LLM gets the same short language pre-training as the LLaVA demo's
(pretraining.py: the demo text and text-only dialogs in the model's own chat format with random answers), so it knows
the language and the format but nothing about images, and tuning has to teach that.

In:  the demo texts and questions, an output directory, the family's name.
Out: one model directory laid out as the hub's release is, which align takes as `--model` and tune `--from ALIGN`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .pretraining import chat_texts, pretrain

# 64 px demo images are resized up to 224 x 224 px (min = max pixels): 64 image tokens each, so every merged token
# sees a 28 px patch of a 64 px image and a lesion changes several of them. Measured on the demo's 120 held-out
# questions (chance 0.417): 112 px 0.750, 224 px 0.867 at the LLaVA demo's 6 epochs; a 128-wide tower 0.875 at twice
# the time; 224 px with 10 epochs 0.975 (about 200 s on 2 cores), which the demo runs.
DEMO_PIXELS = 224 * 224
# the tune stage's settings that differ from the LLaVA demo's recipe: a tower trained by nobody (random, frozen)
# needs more passes for the merger and the adapter to read it; the user's --set still wins
TUNE_OVERRIDES = ["train.epochs=10"]


def _qwen2_5_vl(out_dir: Path, corpus: list[str]) -> Path:
    from .qwen_vl import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(out_dir, corpus, hidden=128, layers=2, heads=4, vocab_size=700, vision_hidden=64,
                                 min_pixels=DEMO_PIXELS, max_pixels=DEMO_PIXELS)


# family -> (builder, the template its dialogs are pre-trained in)
NATIVE_DEMOS = {"qwen2.5-vl": (_qwen2_5_vl, "qwen2-vl")}
DEMO_FAMILIES = ("llava", *NATIVE_DEMOS)


def build_tiny_native(out_dir: Path, texts: list[str], questions: list[tuple[str, list[str]]], family: str,
                      steps: int = 300, seed: int = 0) -> tuple[Path, str]:
    """Write a pre-trained tiny model of `family` to `out_dir`; return (its directory, its template)."""
    import torch

    from ..model import load_tokenizer_and_processor, load_vlm

    if family not in NATIVE_DEMOS:
        raise UserError(f"demo --family {family}: choose llava or one of {', '.join(NATIVE_DEMOS)}")
    build, template = NATIVE_DEMOS[family]
    dialogs = chat_texts({"questions": questions}, n=2000, seed=seed, template=template)
    corpus = list(texts) + dialogs
    torch.manual_seed(seed)
    out_dir = build(Path(out_dir), corpus)
    model = load_vlm(str(out_dir), dtype="float32", attn="sdpa")
    tok, _ = load_tokenizer_and_processor(str(out_dir))
    tok.pad_token = tok.pad_token or "<|endoftext|>"  # padding is masked from the loss; the saved tokenizer stays
    pretrain(model, tok, corpus, steps=steps, seed=seed)
    model.save_pretrained(out_dir)  # the weights only: tokenizer, processor and template stay as built
    return out_dir, template
