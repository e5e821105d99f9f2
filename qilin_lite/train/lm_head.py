"""The training loss's LM head on the CPU: only the supervised positions, in plain torch.

In:  a causal LM (a Llava) and a micro-batch with labels (-100 where nothing is supervised).
Out: trl's `FusedCausalLMOutput`: each next-token label's log-probability (zero elsewhere) and the label mask, and
     when asked, each supervised position's entropy and top-1 hit (what trl's log reads), without gradient.

trl's fused head (`add_fused_lm_head`) never materialises the (batch, length, vocab) logits: on CUDA / XPU its Triton
kernel scores only the supervised positions. Without Triton (the CPU) it scores every position, in torch tiles
folded into an online logsumexp, and recomputes the tiles in backward: 34 ms of a 330 ms full fine-tune step of the
benchmark model, where LLaMA-Factory's plain logits + cross-entropy took about 5 (benchmarks/README.md, "Against
LLaMA-Factory"). One matmul and log_softmax over the supervised positions gives the same log-probabilities to float
rounding and holds only (supervised positions x vocab) logits.

Every micro-batch of a run goes through the same head, the ones that log included (their metrics are computed
beside the loss, never in it): a resumed run then repeats the uninterrupted one to the bit (on the same thread
count: a matrix product over the supervised positions splits its sums by it), which it would not if the logging
steps took trl's tiles and the others this head.
"""

from __future__ import annotations

import torch


def plain_head_for(device: torch.device) -> bool:
    """The CPU only. On a GPU trl's head is kept: its Triton kernel scores only the supervised positions already, and
    where Triton is missing its tiles keep memory at what the planner assumes, where this head's fp32 logits of
    every supervised position (2048 x 32,000 x 4 bytes per 13B sample, twice with log_softmax) would not."""
    return device.type == "cpu"


def plain_head_ok(model) -> bool:
    """The plain head computes softmax(hidden @ W.T + b): models whose head scales or caps the logits, or that add a
    router loss, keep trl's."""
    cfg = model.config.get_text_config()
    return all(getattr(cfg, k, None) is None for k in ("final_logit_softcapping", "lm_head_multiplier",
                                                      "logits_scaling", "logit_scale", "output_multiplier")) \
        and not getattr(cfg, "output_router_logits", False)


def supervised_head(model, *args, labels=None, shift_labels=None, num_items_in_batch=None, metrics: bool = False,
                    fused_lm_head=True, **kwargs):
    """`model(..., labels=labels, fused_lm_head=True)` as trl's fused head answers it: log-probabilities, and with
    `metrics` the entropy and top-1 hit trl computes for its log (argmax's first maximum: trl's tie rule)."""
    from .private_api import fused_output

    kwargs["use_cache"] = False
    hidden = model.base_model(*args, **kwargs).last_hidden_state  # the backbone trl's head uses too
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    head = model.get_output_embeddings()
    mask = (labels != -100).to(head.weight.device)
    targets = labels.to(head.weight.device)[mask]
    logits = head(hidden.to(head.weight.device)[mask]).float()
    logp = logits.log_softmax(-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    log_probs = lp.new_zeros(mask.shape).masked_scatter(mask, lp)  # stays connected when nothing is supervised
    entropy = is_top1 = None
    if metrics:
        with torch.no_grad():
            ent = -(logp.exp() * logp).sum(-1)
            entropy = ent.new_zeros(mask.shape).masked_scatter(mask, ent)
            is_top1 = mask.new_zeros(mask.shape).masked_scatter(mask, logits.argmax(-1) == targets)
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    return fused_output(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask)
