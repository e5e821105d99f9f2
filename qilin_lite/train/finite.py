"""A run whose loss or trained weights stop being finite (NaN, inf) stops there, before it saves them.

In:  the Trainer's public hooks (a TrainerCallback): the logged loss, and the trainable weights at the steps that
     log, evaluate or save and at the last step.
Out: training stopped at the first such step, with that step's checkpoint and evaluation cancelled, so every
     checkpoint on disk holds finite weights; `NonFinite.problem` says what went wrong, and stage.py raises it as a
     UserError instead of saving a model or reporting the run done.

A NaN loss on one micro-batch does not stop the run: the Trainer's NaN/inf filter counts it as the mean loss so
far, and the weights it leaves are finite (what its gradient does to them is checked here). Only weights or a
logged loss that are themselves non-finite stop it.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from ..distributed import any_process


class NonFinite(TrainerCallback):
    def __init__(self):
        self.problem: str | None = None  # what became non-finite, once it has
        self.step: int | None = None
        self._checked = -1  # the global step whose weights were last found finite

    # ---------------------------------------------------------------- when
    def on_step_end(self, args, state, control, **kwargs):
        # DefaultFlowCallback ran first and decided this step's log / evaluation / save; Preemption (added before
        # this callback) may have asked for a save too: the weights are read before any of them happens
        due = control.should_log or control.should_save or control.should_evaluate or control.should_training_stop
        if self.problem is None and due:
            self._check_weights(kwargs["model"], state.global_step)
        return self._hold(control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # the log comes before the step's evaluation and save (Trainer._maybe_log_save_evaluate)
        loss = (logs or {}).get("loss")
        bad = isinstance(loss, (int, float)) and not math.isfinite(loss)
        if self.problem is None and any_process(bad):
            self._stop(state.global_step, f"the training loss is {loss}")
        return self._hold(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._hold(control)  # an epoch-end save or evaluation after the stop

    def on_train_end(self, args, state, control, **kwargs):
        if self.problem is None and self._checked != state.global_step:
            self._check_weights(kwargs["model"], state.global_step)

    # ---------------------------------------------------------------- what
    def _check_weights(self, model, step: int) -> None:
        params = [(n, _local(p)) for n, p in model.named_parameters() if p.requires_grad]
        params = [(n, t) for n, t in params if t.numel()]
        # one flag per tensor, read back once: a host sync per log step, not one per parameter
        bad = bool(params) and bool(torch.stack([(~torch.isfinite(t).all()).to(params[0][1].device)
                                                 for _, t in params]).any())
        if any_process(bad):
            first = next((n for n, t in params if not torch.isfinite(t).all()), None)
            self._stop(step, f"the trained weights are NaN or infinite{f' ({first}, ...)' if first else ''}")
        else:
            self._checked = step

    def _stop(self, step: int, problem: str) -> None:
        self.step, self.problem = step, problem

    def _hold(self, control):
        if self.problem is not None:  # nothing non-finite is saved, evaluated or trained further
            control.should_save = control.should_evaluate = False
            control.should_training_stop = True
        return control


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: the local shard of an FSDP2 DTensor, ZeRO-3's partition (its
    parameter is an empty placeholder outside forward), else the parameter itself."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    if hasattr(p, "to_local"):
        return p.to_local()
    return p.detach()
