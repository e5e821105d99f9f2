"""The order samples are trained in: transformers' length-grouped order, drawn from (seed, epoch) alone.

Shared by the trainer (its sampler) and packing's cost model (which lays out an epoch the way training will).
"""

from __future__ import annotations

import torch


def grouped_order(lengths, group_size: int, seed: int) -> list[int]:
    """transformers' length-grouped order (megabatches of similar lengths, the longest batch first), drawn from
    `seed` alone. `group_size` is what the Trainer passes: per-device batch x accumulation."""
    from .private_api import length_grouped_indices

    g = torch.Generator()
    g.manual_seed(seed)
    return length_grouped_indices(lengths, group_size, generator=g)


class EpochGroupedSampler(torch.utils.data.Sampler):
    """transformers' length-grouped order, drawn from (seed, epoch) alone.

    The stock LengthGroupedSampler draws from the global RNG, whose state at the start of an epoch depends on
    everything that ran before (dropout, logging, evaluation); a run resumed inside its second epoch then trained on
    other batches than the uninterrupted run. Here each epoch's order is fixed in advance, so a resume anywhere
    continues the same sequence of batches. The Trainer (through accelerate) calls `set_epoch` every epoch."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        self.batch_size, self.lengths, self.seed, self.epoch = batch_size, lengths, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(grouped_order(self.lengths, self.batch_size, self.seed + self.epoch))
