"""The training loss's LM head on the CPU: only the supervised positions, in plain torch.

In:  a causal LM (a Llava) and a training micro-batch with labels (-100 where nothing is supervised).
Out: trl's `FusedCausalLMOutput` with each next-token label's log-probability (zero elsewhere) and the label mask,
     what `QilinTrainer._lean_loss` reads from trl's fused head.

trl's fused head (`add_fused_lm_head`) never materialises the (batch, length, vocab) logits: on CUDA / XPU its Triton
kernel scores only the supervised positions. Without Triton (the CPU) it scores every position, in torch tiles
folded into an online logsumexp, and recomputes the tiles in backward. On the benchmark model that was 34 ms of a
330 ms full fine-tune step, where LLaMA-Factory's plain logits + cross-entropy took about 5 (benchmarks/README.md,
"Against LLaMA-Factory"). Scoring only the supervised positions with one matmul and log_softmax gives the same
log-probabilities to float rounding, and holds only (supervised positions x vocab) logits.
"""

from __future__ import annotations

import torch


def plain_head_for(device: torch.device) -> bool:
    """The CPU only. On a GPU trl's head is kept: its Triton kernel scores only the supervised positions already, and
    where Triton is missing its tiles keep memory at what the planner assumes, where this head's fp32 logits of
    every supervised position (2048 x 32,000 x 4 bytes per 13B sample, twice with log_softmax) would not."""
    return device.type == "cpu"


def plain_head_ok(model) -> bool:
    """The plain head computes softmax(hidden @ W.T + b): models whose head scales or caps the logits keep trl's."""
    cfg = model.config.get_text_config()
    return all(getattr(cfg, k, None) is None for k in ("final_logit_softcapping", "lm_head_multiplier",
                                                      "logits_scaling", "logit_scale"))


def supervised_log_probs(model, *args, labels=None, num_items_in_batch=None, fused_lm_head=True, **kwargs):
    """`model(..., labels=labels, fused_lm_head=True)` as trl's fused head answers it, for log-probabilities only."""
    from trl.trainer.utils import FusedCausalLMOutput

    kwargs["use_cache"] = False
    hidden = model.base_model(*args, **kwargs).last_hidden_state[:, :-1]  # the backbone trl's head uses too
    labels = labels[:, 1:]
    head = model.get_output_embeddings()
    mask = (labels != -100).to(head.weight.device)
    targets = labels.to(head.weight.device)[mask]
    picked = head(hidden.to(head.weight.device)[mask]).float().log_softmax(-1)
    lp = picked.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    log_probs = lp.new_zeros(mask.shape).masked_scatter(mask, lp)  # stays connected when nothing is supervised
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=mask)
