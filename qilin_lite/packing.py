"""Packing: several samples per row, laid end to end, and the cost model that decides whether it pays.

In:  a `VisionTextDataset` (processing.py) and its sample lengths.
Out: `PackedDataset` rows whose `position_ids` restart at each sample (no sample attends to another), and
`choose_packing`'s verdict for `--packing`: rows of max_length when they save work, each sample attending only to
itself (flash-attn's varlen kernel, or segments.py's per-sample sdpa without it), else none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .processing import VisionTextDataset
from .sampler import grouped_order

log = logging.getLogger(__name__)


def pack(lengths, max_length: int) -> list[list[int]]:
    """Group sample indices into rows of at most `max_length` tokens (best-fit decreasing; deterministic).

    Each sample keeps its own image tokens whole: samples are never split across rows.
    """
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row) kept sorted: best fit is one bisect away
    for i in order:
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):  # nothing fits: open a row
            rows.append([i])
            bisect.insort(free, (max_length - n, len(rows) - 1))
        else:
            room, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (room - n, r))
    return rows


# Without flash-attn, pack only for at least this much less estimated work: the estimate counts FLOPs, and the
# per-sample attention calls cost some host time; one sample per row would be packing in name only.
PACKING_MIN_GAIN = 0.03


@dataclass
class PackingChoice:
    """What `--packing` will do, and why: `row_length` None means train unpacked."""

    row_length: int | None
    attention: str
    work_vs_unpacked: float  # the chosen layout's model FLOPs per epoch over the unpacked (padded batches) ones
    packed_at_max_vs_unpacked: float  # the same for rows of the full max_length
    reason: str


def layout_flops(batches: list[list[int]], sample_lengths: list[list[int]], width: int, ff: int, kv_width: int,
                 varlen: bool) -> float:
    """Model FLOPs per layer of one epoch laid out as `batches` (each a list of rows; a row holds the lengths of the
    samples packed in it). Every row is padded to its batch's longest. Linear layers cost per token (q, o: width^2;
    k, v: width x kv_width; the gated MLP: 3 x width x ff); attention costs 4 x width per (query, key) pair. Without a
    variable-length kernel (sdpa, eager) a row attends as one L x L block, its mask only zeroing the cross-sample
    pairs; flash-attention's varlen kernel computes each sample's own block."""
    linear = 2 * (2 * width * width + 2 * width * kv_width + 3 * width * ff)
    total = 0.0
    for rows in batches:
        longest = max(sum(sample_lengths[r]) for r in rows)
        for r in rows:
            lens = sample_lengths[r]
            pad = longest - sum(lens)
            pairs = sum(n * n for n in lens) + pad * pad if varlen else longest * longest
            total += linear * longest + 4 * width * pairs
    return total


def choose_packing(lengths, batch_size: int, max_length: int, attention: str, text_config, seed: int = 0,
                   grouped: bool = True, accumulation: int = 1) -> PackingChoice:
    """Rows for `--packing` that never cost more than training unpacked.

    Packed rows cost only their samples' own attention: with flash-attention 2 (its variable-length kernel), else
    with `qilin_segments` (segments.py: sdpa per sample). So rows of max_length, which remove the most padding, win;
    packing is left off when that saves less than PACKING_MIN_GAIN of the unpacked work (length-grouped or random
    batches, as the run samples them; grouped in the training sampler's own order, over per-device batch x
    `accumulation`). Unpacked batches under sdpa/eager pay every padded row's full attention; under flash-attn only
    the real tokens'."""
    from .segments import SEGMENTS

    lengths = [int(x) for x in lengths]
    width, ff = int(text_config.hidden_size), int(text_config.intermediate_size)
    heads = int(text_config.num_attention_heads)
    kv_width = width // heads * int(getattr(text_config, "num_key_value_heads", None) or heads)
    flash = attention == "flash_attention_2"

    def epoch_batches(row_lengths: list[int]) -> list[list[int]]:
        if grouped:
            order = grouped_order(row_lengths, batch_size * accumulation, seed)
        else:
            order = torch.randperm(len(row_lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    unpacked = layout_flops(epoch_batches(lengths), [[n] for n in lengths], width, ff, kv_width, flash)
    rows = pack(lengths, max(max_length, max(lengths)))  # the authors' cut counts an image as one id: a sample can
    per_row = [[lengths[i] for i in r] for r in rows]    # exceed max_length, and then gets a row of its own
    at_max = layout_flops(epoch_batches([sum(r) for r in per_row]), per_row, width, ff, kv_width, True) / unpacked
    if flash:
        return PackingChoice(max_length, attention, at_max, at_max,
                             "flash-attention 2 computes each sample's own attention: rows of max_length")
    if at_max > 1.0 - PACKING_MIN_GAIN:
        return PackingChoice(None, attention, 1.0, at_max, (
            f"rows of {max_length} would cost {at_max:.2f}x the unpacked work (little padding to remove), less than "
            f"{PACKING_MIN_GAIN:.0%} saved: training unpacked"))
    return PackingChoice(max_length, SEGMENTS, at_max, at_max, (
        f"each sample in a packed row attends only to itself ({SEGMENTS}: sdpa per sample, no flash-attn needed): "
        f"rows of {max_length} cost {at_max:.2f}x the unpacked work"))


class PackedDataset(torch.utils.data.Dataset):
    """Rows of several samples laid end to end, `position_ids` restarting at each sample and no attention mask.

    transformers then builds a block-diagonal causal mask from the positions (sdpa/eager) and flash-attn uses
    the same positions for its variable-length kernels, so no sample attends to another. The model must run
    without a KV cache, or the packed-sequence detection is skipped. Each sample's first label is -100 (BOS or
    image), so no token is trained to predict across a sample boundary.
    """

    def __init__(self, ds: VisionTextDataset, max_length: int):
        self.ds, self.max_length = ds, max_length
        self.rows = pack(ds.lengths, max_length)
        self.lengths = np.array([sum(int(ds.lengths[i]) for i in r) for r in self.rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> dict:
        items, used = [], 0
        for it in self.ds.__getitems__(self.rows[r]):  # one image-processor call for the row
            # a sample that failed to load is replaced by another, maybe longer, one: never overflow the row
            if used + len(it["input_ids"]) > self.max_length:
                log.warning("packed row %d: a substituted sample does not fit; it is left out of this row", r)
                continue
            items.append(it)
            used += len(it["input_ids"])
        out = {
            "input_ids": torch.cat([it["input_ids"] for it in items]),
            "labels": torch.cat([it["labels"] for it in items]),
            "position_ids": torch.cat([torch.arange(len(it["input_ids"])) for it in items]),
        }
        pix = [it["pixel_values"] for it in items if it.get("pixel_values") is not None]
        out["pixel_values"] = torch.cat(pix) if pix else None
        return out
