"""The tiny stand-in LLMs' language pre-training (base.py's LLaMA, qwen.py's Qwen2): a real base LLM already knows
its language, so the tiny one is trained on the demo text and on text-only dialogs in its chat format whose answers
are drawn at random: it learns the language and the format, but nothing about images.
"""

from __future__ import annotations

import random

import torch

from ..families import TEMPLATES, render


def chat_texts(spec_texts: dict, n: int, seed: int, template: str = "vicuna_v1", eos: str = "") -> list[str]:
    """Text-only dialogs in a chat format with random answers: format knowledge, no image knowledge."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q, choices = rng.choice(spec_texts["questions"])
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": rng.choice(choices)}]
        out.append(render(msgs, TEMPLATES[template], eos=eos).text)
    return out


def pretrain(lm, tok, corpus: list[str], steps: int, seed: int, batch: int = 32, lr: float = 3e-3) -> float:
    """Plain next-token training on the corpus; returns the last loss."""
    rng = random.Random(seed)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token  # padding is masked from the loss; the saved tokenizer stays as trained
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    lm.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        texts = [rng.choice(corpus) for _ in range(batch)]
        enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = lm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    lm.eval()
    return float(loss.detach())
