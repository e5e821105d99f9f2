"""Which process am I, and how processes share work before the Trainer exists.

Under torchrun every process runs the whole command. The data checks before training split their work by rank
and share the results, so each process holds the same records and the ranks' datasets stay identical.
"""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def my_share(n: int) -> range:
    """The indices of n items this process works on when each takes every world_size()-th one."""
    return range(rank(), n, world_size())


def gather_dicts(local: dict) -> dict:
    """The union of every process's `local` (itself when there is one process), the same on every process."""
    if world_size() == 1:
        return local
    import torch.distributed as dist
    from accelerate import PartialState

    PartialState()  # joins the process group torchrun prepared (the Trainer would, a little later)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def wait_for_everyone() -> None:
    """A barrier when several processes run; nothing otherwise."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any of them (itself with one process): a decision to stop or
    skip a save must be the same everywhere, or the next collective hangs."""
    if world_size() == 1:
        return flag
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
