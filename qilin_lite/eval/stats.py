"""How sure a score is: 95% bootstrap intervals for one run, and paired tests between two runs on the same questions.

Every interval and test here is seeded and recorded (`BOOTSTRAP` goes into metrics.json), so a rerun gives the
same numbers. Per-question values are what the metric averages: 1/0 for a right/wrong closed or multiple-choice
answer, the token recall of an open answer, the ROUGE-L of a caption. Corpus BLEU is not a mean of per-question
values and gets no interval.

- `bootstrap_ci`: percentile interval of the mean over `resamples` resamples of the questions (Efron & Tibshirani).
- `paired`: the difference of two runs' means on the same questions, its paired-bootstrap interval, and a p-value:
  McNemar's exact test (a two-sided binomial test on the discordant questions) when both runs' values are 0/1,
  else the paired bootstrap's two-sided p (twice the smaller tail of the resampled differences around 0).
"""

from __future__ import annotations

from math import comb
from typing import Sequence

import numpy as np

BOOTSTRAP = {"method": "percentile", "level": 0.95, "resamples": 2000, "seed": 0}
ALPHA = 0.05


def _resample_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(values)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):  # 256 resamples at a time: bounded memory for 100k-question sets
        k = min(256, resamples - start)
        means[start : start + k] = values[rng.integers(0, n, size=(k, n))].mean(axis=1)
    return means


def bootstrap_ci(values: Sequence[float], *, resamples: int = BOOTSTRAP["resamples"],
                 seed: int = BOOTSTRAP["seed"], level: float = BOOTSTRAP["level"]) -> list[float] | None:
    """[low, high] of the mean of `values`; None for no values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return None
    means = _resample_means(v, resamples, seed)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return [round(float(lo), 6), round(float(hi), 6)]


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided exact McNemar p for paired 0/1 outcomes: only questions the two runs disagree on count."""
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    n01, n10 = int(np.sum(~a & b)), int(np.sum(a & ~b))
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    p = 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, p)


def paired(a: Sequence[float], b: Sequence[float], *, resamples: int = BOOTSTRAP["resamples"],
           seed: int = BOOTSTRAP["seed"], level: float = BOOTSTRAP["level"]) -> dict:
    """Run b minus run a on the same questions (same order): {diff, ci95, p, test, significant}."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired values need the same, non-zero length: {a.size} and {b.size}")
    d = b - a
    means = _resample_means(d, resamples, seed)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    binary = bool(np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all())
    if binary:
        p, test = mcnemar_exact(a, b), "mcnemar-exact"
    else:
        p = min(1.0, 2 * min(np.mean(means <= 0), np.mean(means >= 0))) if d.any() else 1.0
        test = "paired-bootstrap"
    return {"diff": round(float(d.mean()), 6), "ci95": [round(float(lo), 6), round(float(hi), 6)],
            "p": float(f"{p:.4g}"), "test": test, "significant": bool(p < ALPHA)}
