"""Packed rows without flash-attn: each sample attends only to itself, at the cost of its own attention.

Without a variable-length kernel, transformers gives a packed row (several samples, `position_ids` restarting at each)
a block-diagonal mask and sdpa/eager still compute the whole L x L row, so packing paid only with flash-attn.
`qilin_segments` is an attention function registered with transformers' AttentionInterface: it finds each sample's
span from the row's `position_ids` (a new span wherever a position is not the previous one plus one) and runs causal
sdpa on that span alone, so a row costs the sum of its samples' attention, as flash-attn's varlen kernel does. The
padding at the end of a shorter row is one more span (its positions run 0, 1, ...; its labels are ignored).

On a CUDA GPU without flash-attn, packed rows train with transformers' `flex_attention` instead (`packed_kernel`):
given `position_ids` and no attention mask or cache (training), transformers turns each run of positions into a
document of a block mask, and FlexAttention skips the blocks between documents in one kernel. In torch 2.13
FlexAttention has no backward on the CPU (NotImplementedError), so the CPU keeps this per-span sdpa.

Used for training only, while a packed dataset trains (stage.py switches the language model to it and back before
saving): there is no attention mask and no cache, so it is not for generation or left-padded batches.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SEGMENTS = "qilin_segments"
FLEX = "flex_attention"


def packed_kernel(on_cuda: bool) -> str:
    """The attention packed rows train with when flash-attn is not there: FlexAttention's document mask on a CUDA GPU
    where it compiles and backpropagates, else per-span sdpa (`qilin_segments`). Both cost each sample's own
    attention."""
    return FLEX if on_cuda and flex_trains("cuda") else SEGMENTS


@functools.cache
def flex_trains(device: str) -> bool:
    """Does FlexAttention run forward and backward here? Tried once on a tiny causal block mask: it needs torch >= 2.5
    and a working Triton on GPUs, and torch 2.13 has no backward on the CPU. A failure is one warning and the
    per-span sdpa, not a crash at the first training step."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q = torch.randn(1, 1, 128, 16, device=device, requires_grad=True)
        mask = create_block_mask(lambda b, h, i, j: i >= j, 1, 1, 128, 128, device=device)
        torch.compile(flex_attention)(q, q, q, block_mask=mask).sum().backward()
        return True
    except Exception as e:  # noqa: BLE001 - any failure (import, compile, kernel) means: use the other kernel
        log.warning("FlexAttention does not train on %s here (%s: %s); packed rows use per-span sdpa",
                    device, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return False


def spans(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of one row's runs of consecutive positions."""
    breaks = (position_ids[1:] != position_ids[:-1] + 1).nonzero().flatten() + 1
    edges = [0, *breaks.tolist(), int(position_ids.numel())]
    return list(zip(edges[:-1], edges[1:]))


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None,
                      **kwargs):
    """query (B, H, L, D), key/value (B, Hkv, L, D) -> (B, L, H, D), as transformers' attention functions return.

    The rows are taken apart with unbind/split and put together with cat/stack, whose backwards are one stack/cat:
    indexing each span (`query[b:b+1, :, s:e]`) would give every span a full-size zero gradient in backward, and
    filling those was most of a packed step (a row of 14 samples: 14 full-row fills per tensor per layer).
    """
    B, H, L, _ = query.shape
    if position_ids is None:
        position_ids = torch.arange(L, device=query.device).expand(B, L)
    gqa = key.shape[1] != H
    rows = []
    for b, (q, k, v) in enumerate(zip(query.unbind(0), key.unbind(0), value.unbind(0))):
        lengths = [e - s for s, e in spans(position_ids[b])]
        parts = [F.scaled_dot_product_attention(qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0), dropout_p=dropout,
                                                is_causal=True, scale=scaling, enable_gqa=gqa)[0]
                 for qs, ks, vs in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, 1))
    return torch.stack(rows).transpose(1, 2), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SEGMENTS, segment_attention)


def use(model, implementation: str) -> str:
    """Set the language model's attention implementation; returns the one it had (to switch back before saving)."""
    from .private_api import attention_of, set_attention

    cfg = model.config.get_text_config()
    before = attention_of(cfg)
    if implementation == SEGMENTS:
        register()
    set_attention(cfg, implementation)
    return before
