"""Samples -> one padded batch: right padding, labels padded with -100, packed rows' positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..families import IGNORE

MARKS = ("mm_token_type_ids", "token_type_ids")  # the image-token marks families name (Family.image_marks)


@dataclass
class Collator:
    """Pads a list of samples on the right; labels pad with -100 so padding is never supervised."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, samples: list[dict]) -> dict:
        longest = max(len(s["input_ids"]) for s in samples)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        n = len(samples)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE, dtype=torch.long)
        attention = torch.zeros((n, longest), dtype=torch.long)
        marks = next((k for k in MARKS if k in samples[0]), None)
        kinds = torch.zeros((n, longest), dtype=torch.long) if marks else None
        for k, s in enumerate(samples):
            L = len(s["input_ids"])
            input_ids[k, :L] = s["input_ids"]
            labels[k, :L] = s["labels"]
            attention[k, :L] = 1
            if kinds is not None:
                kinds[k, :L] = s[marks]
        if "position_ids" in samples[0]:
            # packed rows: positions restart per sample; padding forms its own run starting at 0, and no attention
            # mask is passed: with no cache (training) transformers then builds the per-sample mask for sdpa and
            # flex_attention from the positions (with a cache it does not); flash-attention 2 reads them itself
            pos = torch.zeros((n, longest), dtype=torch.long)
            for k, s in enumerate(samples):
                L = len(s["position_ids"])
                pos[k, :L] = s["position_ids"]
                pos[k, L:] = torch.arange(longest - L)
            batch = {"input_ids": input_ids, "labels": labels, "position_ids": pos}
        else:
            batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
        if kinds is not None:  # image tokens 1, the rest (padding too) 0
            batch[marks] = kinds
        for key in ("pixel_values", "image_grid_thw"):  # images in row order, as the model consumes them
            parts = [s[key] for s in samples if s.get(key) is not None]
            if parts:
                batch[key] = torch.cat(parts)
        return batch
