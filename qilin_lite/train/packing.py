"""Packing: several samples per row, laid end to end, and the cost model that decides whether it pays.

In:  a `VisionTextDataset` (dataset.py) and its sample lengths.
Out: `PackedDataset` rows whose `position_ids` restart at each sample (no sample attends to another), and
`choose_packing`'s verdict for `--packing`: the row length with the least estimated work, or none when training
unpacked costs less. Packed rows train with each sample attending only to itself (flash-attn's varlen kernel, or
segments.py's per-sample sdpa without it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..device import cuda
from .dataset import VisionTextDataset
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


# Pack only for at least this much less estimated work. The estimate counts FLOPs; one sample per row would be
# packing in name only. On the CPU a packed micro-batch (rows of 2048) is many times the tokens of an unpacked one and
# its element-wise work falls out of the caches: per token it measured 1.2x the unpacked cost
# (benchmarks/packed_vs_unpacked.py), so there it must save more to pay.
PACKING_MIN_GAIN = 0.03
PACKING_MIN_GAIN_CPU = 0.20


@dataclass
class PackingChoice:
    """What `--packing` will do, and why: `row_length` None means train unpacked."""

    row_length: int | None
    attention: str
    work_vs_unpacked: float  # the chosen layout's model FLOPs per epoch over the unpacked (padded batches) ones
    packed_at_max_vs_unpacked: float  # the same for rows of the full max_length
    reason: str


def layout_flops(batches: list[list[int]], sample_lengths: list[list[int]], width: int, ff: int, kv_width: int,
                 varlen: bool = True) -> float:
    """Model FLOPs per layer of one epoch laid out as `batches` (each a list of rows; a row holds the lengths of the
    samples packed in it). Every row is padded to its batch's longest. Linear layers cost per token (q, o: width^2;
    k, v: width x kv_width; the gated MLP: 3 x width x ff); attention costs 4 x width per (query, key) pair. `varlen`:
    each sample's own block, as flash-attention's varlen kernel and segments.py compute it (packed rows always train
    so); otherwise a row attends as one L x L block, as a masked row would under sdpa or eager."""
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
                   grouped: bool = True, accumulation: int = 1, on_cpu: bool | None = None) -> PackingChoice:
    """Rows for `--packing` that never cost more than training unpacked.

    Packed rows train with each sample attending only to itself (flash-attention 2's variable-length kernel, or
    segments.py's per-sample sdpa without it), so a packed layout costs its samples' own work plus the padding left
    at the end of rows, and packing saves the rest of the padding. With flash-attention 2 (a CUDA GPU): rows of
    max_length. Otherwise the row length with the least estimated work wins among max_length and shorter candidates,
    and packing is left off unless it saves at least PACKING_MIN_GAIN of the unpacked work (PACKING_MIN_GAIN_CPU on
    the CPU, `on_cpu` defaulting to "no CUDA GPU here"). The unpacked batches are laid out as the run samples them:
    length-grouped in the training sampler's own order over per-device batch x `accumulation`, or random."""
    lengths = [int(x) for x in lengths]
    width, ff = int(text_config.hidden_size), int(text_config.intermediate_size)
    heads = int(text_config.num_attention_heads)
    kv_width = width // heads * int(getattr(text_config, "num_key_value_heads", None) or heads)
    on_cpu = not cuda() if on_cpu is None else on_cpu

    def epoch_batches(row_lengths: list[int]) -> list[list[int]]:
        if grouped:
            order = grouped_order(row_lengths, batch_size * accumulation, seed)
        else:
            order = torch.randperm(len(row_lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    unpacked = layout_flops(epoch_batches(lengths), [[n] for n in lengths], width, ff, kv_width, True)

    def packed_work(row_length: int) -> float:
        rows = pack(lengths, row_length)
        per_row = [[lengths[i] for i in r] for r in rows]
        return layout_flops(epoch_batches([sum(r) for r in per_row]), per_row, width, ff, kv_width, True)

    at_max = packed_work(max_length) / unpacked
    if attention == "flash_attention_2":
        return PackingChoice(max_length, attention, at_max, at_max,
                             "flash-attention 2 computes each sample's own attention: rows of max_length")
    longest = max(lengths)
    top = max(max_length, longest)  # the authors' cut counts an image as one id: a sample can exceed max_length
    candidates = sorted({top, *range(longest, top, max(1, (top - longest) // 16))})
    work = {c: at_max if c == max_length else packed_work(c) / unpacked for c in candidates}  # max_length: known
    best = min(work, key=lambda c: (work[c], -c))
    gain = PACKING_MIN_GAIN_CPU if on_cpu else PACKING_MIN_GAIN
    if work[best] > 1.0 - gain:
        why = " (the CPU's margin: a packed batch costs more per token there)" if on_cpu else ""
        return PackingChoice(None, attention, 1.0, at_max, (
            f"on this data rows of {max_length} would cost {at_max:.2f}x the unpacked work and no row length saves "
            f"{gain:.0%}{why}: training unpacked ({attention})"))
    from .segments import packed_kernel

    kernel = packed_kernel(not on_cpu)
    return PackingChoice(best, kernel, work[best], at_max, (
        f"rows of {best} tokens cost the least: {work[best]:.2f}x the unpacked work (rows of {max_length}: "
        f"{at_max:.2f}x); each sample attends only to itself ({kernel}, as flash-attention 2 would)"))


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
