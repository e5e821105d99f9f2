"""ChiMed-VL text lengths -> sample lengths -> real-token fraction of the batches each sampler makes.

In:  the published ChiMed-VL length statistics (shared/REFERENCE.md: median, quartiles and maximum of each text
     field, in tokens), a seed, and a per-device batch size.
Out: synthetic text lengths whose median and quartiles match the published ones, whole-sample lengths for a model
     with a given number of image tokens, and the fraction of the tokens in a batch that are not padding, for

- `random`: what a stock `SFTTrainer` does (random order, each batch padded to its longest sample);
- `grouped`: qilin-lite's `QilinTrainer` (transformers' `LengthGroupedSampler` over precomputed lengths);
- `packed`: qilin-lite with `--packing` (`processing.pack` rows, then the same grouped sampler over row lengths).

The fraction depends only on the lengths and the batching, so it is computed here for the real model (576 image
tokens, the paper's per-GPU batch sizes 32 and 16) without running a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z75 = 0.6744897501960817  # 75th percentile of the standard normal


@dataclass(frozen=True)
class LengthStat:
    """A published token-length distribution: median, quartiles and maximum."""

    median: int
    q1: int
    q3: int
    max: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        # A two-piece log-normal: log-length is normal with one sigma below the median and another above, so the
        # median and both quartiles match the published ones exactly (the published quartiles are not symmetric in
        # log space, e.g. contexts 435/211 = 2.06 but 757/435 = 1.74); clipped at the published maximum.
        z = rng.standard_normal(n)
        lo, hi = math.log(self.median / self.q1) / Z75, math.log(self.q3 / self.median) / Z75
        x = self.median * np.exp(np.where(z < 0, z * lo, z * hi))
        return np.clip(np.rint(x), 1, self.max).astype(np.int64)

    def clipped_mean(self, rng: np.random.Generator, n: int = 200_000) -> float:
        return float(self.sample(rng, n).mean())


# ChiMed-VL (shared/REFERENCE.md), tokens
CAPTION = LengthStat(75, 47, 132, 1551)  # alignment: inline descriptions / captions
CONTEXT = LengthStat(435, 211, 757, 2576)  # alignment: contexts
QUESTION = LengthStat(20, 16, 25, 4040)  # instruction: questions
ANSWER = LengthStat(22, 12, 34, 732)  # instruction: answers
# Share of alignment items whose text is a context: PMC-CaseReport items (316,838 of 580,014) come with the case
# report's context, PMC-OA items (263,176) with a caption. `token_share_context()` gives the other reading.
CONTEXT_SHARE = 316_838 / 580_014
CONTEXT_TOKENS, CAPTION_TOKENS = 167e6, 63e6  # published totals

REAL_IMAGE_TOKENS = 576  # CLIP ViT-L/14-336, patch tokens only
# Non-image tokens the templates add for the real LLaMA tokenizer: plain = BOS + "\n" after the text;
# vicuna_v1 = BOS, the English system prompt (~33 LLaMA tokens), "USER:", "\n" after <image>, "ASSISTANT:", "</s>"
# (an estimate: no LLaMA tokenizer offline; a constant shift of a few tokens moves the fractions by < 0.001).
PLAIN_OVERHEAD = 2
VICUNA_OVERHEAD = 44
MAX_LENGTH = 2048
PAPER_BATCH = {"align": 32, "tune": 16}  # per GPU (x 8 A100)


def token_share_context(rng: np.random.Generator | None = None) -> float:
    """Context share implied by the published token totals and the fitted (clipped) means: the other reading."""
    rng = rng or np.random.default_rng(0)
    n_ctx = CONTEXT_TOKENS / CONTEXT.clipped_mean(rng)
    n_cap = CAPTION_TOKENS / CAPTION.clipped_mean(rng)
    return n_ctx / (n_ctx + n_cap)


def align_text_lengths(rng: np.random.Generator, n: int, context_share: float = CONTEXT_SHARE) -> np.ndarray:
    """Stage 1 texts: a context with probability `context_share`, else a caption."""
    is_ctx = rng.random(n) < context_share
    return np.where(is_ctx, CONTEXT.sample(rng, n), CAPTION.sample(rng, n))


def tune_text_lengths(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2: (question lengths, answer lengths), one turn per item."""
    return QUESTION.sample(rng, n), ANSWER.sample(rng, n)


def real_model_lengths(stage: str, n: int, seed: int = 0, context_share: float = CONTEXT_SHARE) -> np.ndarray:
    """Whole-sample lengths for the real model: text + template tokens + 576 image tokens, cut at 2048."""
    rng = np.random.default_rng(seed)
    if stage == "align":
        body = align_text_lengths(rng, n, context_share) + PLAIN_OVERHEAD
    else:
        q, a = tune_text_lengths(rng, n)
        body = q + a + VICUNA_OVERHEAD
    return np.minimum(body + REAL_IMAGE_TOKENS, MAX_LENGTH)


# ---------------------------------------------------------------- batching


def random_batches(n: int, batch: int, seed: int = 0) -> list[np.ndarray]:
    """Stock order: a random permutation cut into batches (the last one may be short, as the Trainer keeps it)."""
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i : i + batch] for i in range(0, n, batch)]


def grouped_batches(lengths, batch: int, seed: int = 0) -> list[np.ndarray]:
    """qilin-lite's order: the sampler `QilinTrainer._get_train_sampler` builds, cut into per-device batches."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    g = torch.Generator().manual_seed(seed)
    order = np.fromiter(LengthGroupedSampler(batch, lengths=[int(x) for x in lengths], generator=g), dtype=np.int64)
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def real_fraction(lengths, batches) -> float:
    """Non-padding tokens / all tokens, each batch padded to its longest sample (both collators pad this way)."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[b].sum()) for b in batches)
    total = sum(len(b) * int(lengths[b].max()) for b in batches)
    return real / total


def packed_row_lengths(lengths, max_length: int = MAX_LENGTH) -> np.ndarray:
    from qilin_lite.train.packing import pack

    lengths = np.asarray(lengths)
    return np.array([int(lengths[r].sum()) for r in pack(lengths, max_length)], dtype=np.int64)


def fractions(lengths, batch: int, seed: int = 0, max_length: int = MAX_LENGTH) -> dict:
    """Real-token fraction of stock (random), ours (grouped) and ours packed, on the same lengths."""
    lengths = np.asarray(lengths)
    rows = packed_row_lengths(lengths, max_length)
    return {
        "random": real_fraction(lengths, random_batches(len(lengths), batch, seed)),
        "grouped": real_fraction(lengths, grouped_batches(lengths, batch, seed)),
        # a packed batch is `batch` rows of up to max_length tokens, grouped by row length as in train_stage
        "packed": real_fraction(rows, grouped_batches(rows, batch, seed)),
        "packed_rows": len(rows),
    }


def quartiles(x) -> list[float]:
    return [float(v) for v in np.percentile(np.asarray(x), [25, 50, 75])]
