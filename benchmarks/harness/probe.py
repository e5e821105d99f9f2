"""Timing inside a transformers Trainer: a callback and a subclass that split each optimizer step into its parts.

`instrumented(trainer_cls, probe)` returns `trainer_cls` with `probe` (a `Probe`) attached, the batch fetch, the loss
and the training step timed. Used by vs_trl_throughput.py (ours and stock trl), packed_vs_unpacked.py and
trainer_vs_bare_loop.py. (harness/probe_site/ times any Trainer from outside its process: vs_llamafactory.py.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from transformers import TrainerCallback

PARTS = ("data_wait", "forward_loss", "backward", "optimizer", "other")


@dataclass
class Probe(TrainerCallback):
    """Loop time, samples and tokens of one run, and each optimizer step split into PARTS: data wait (inside
    `get_batch_samples`), forward + loss (`compute_loss`), backward (the rest of `training_step`), optimizer
    (`on_pre_optimizer_step` -> `on_optimizer_step`) and other (the rest: clipping, callbacks, logging, scheduler)."""

    keep_batches: bool = False  # keep each step's micro-batches (trainer_vs_bare_loop.py replays them)
    loop_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of this process over the same span: less sensitive to other users of the CPU
    fetch_s: list = field(default_factory=list)
    step_s: list = field(default_factory=list)
    parts: list = field(default_factory=list)  # per optimizer step: {part: seconds, "total": seconds}
    batches: list = field(default_factory=list)
    samples: int = 0
    real_tokens: int = 0
    all_tokens: int = 0
    shapes: list = field(default_factory=list)
    _t0: float = 0.0
    _c0: float = 0.0
    _ts: float = 0.0
    _opt: float = 0.0
    _pending_wait: float = 0.0
    _cur: dict = field(default_factory=dict)

    def on_train_begin(self, args, state, control, **kw):
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_step_begin(self, args, state, control, **kw):
        self._ts = time.perf_counter()
        self._cur = {p: 0.0 for p in PARTS}
        self._cur["data_wait"], self._pending_wait = self._pending_wait, 0.0  # fetched just before this step began

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self._opt = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kw):
        self._cur["optimizer"] += time.perf_counter() - self._opt

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        self.step_s.append(now - self._ts)
        total = now - self._ts + self._cur["data_wait"]
        self._cur["other"] = total - sum(self._cur[p] for p in PARTS if p != "other")
        self.parts.append({**self._cur, "total": total})
        # the loop ends at the last step: the checkpoint the Trainer writes after it is not training throughput
        self.loop_s = now - self._t0
        self.cpu_s = time.process_time() - self._c0

    def count(self, batch) -> None:
        from collections.abc import Mapping

        # trl's DPO collator returns a BatchFeature (a mapping, not a dict); GRPO's batches are questions (a list,
        # or indices), whose tokens exist only once sampled
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if ids is None:
            return
        self.samples += int(ids.shape[0])
        mask = batch.get("attention_mask")
        self.real_tokens += int(mask.sum()) if mask is not None else int(ids.numel())
        self.all_tokens += int(ids.numel())
        self.shapes.append(tuple(ids.shape))

    def breakdown(self, skip: int = 0) -> dict:
        """Median seconds per optimizer step of each part and of the whole, leaving out `skip` warm-up steps."""
        import statistics

        steps = self.parts[skip:] or self.parts
        return {k: statistics.median(s[k] for s in steps) if steps else 0.0 for k in (*PARTS, "total")}

    def summary(self) -> dict:
        return {
            "loop_s": round(self.loop_s, 3),
            "samples": self.samples,
            "samples_per_s": self.samples / self.loop_s if self.loop_s else 0.0,
            "samples_per_cpu_s": self.samples / self.cpu_s if self.cpu_s else 0.0,
            "data_wait_fraction": sum(self.fetch_s) / self.loop_s if self.loop_s else 0.0,
            "real_token_fraction": self.real_tokens / max(self.all_tokens, 1),
            "tokens_per_step": self.all_tokens / max(len(self.step_s), 1),
            "steps": len(self.step_s),
            "step_s": [round(x, 3) for x in self.step_s],
            "breakdown_s": self.breakdown(skip=1 if len(self.parts) > 2 else 0),
        }


def instrumented(trainer_cls, probe: Probe):
    """`trainer_cls` with the probe attached, the batch fetch, the loss and the training step timed."""
    import torch

    class Timed(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(probe)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            t = time.perf_counter()
            batches, n_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            waited = time.perf_counter() - t
            probe.fetch_s.append(waited)
            probe._pending_wait += waited
            for b in batches:
                probe.count(b)
            if probe.keep_batches:
                probe.batches.append([{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()}
                                      for b in batches])
            return batches, n_items

        def training_step(self, model, inputs, num_items_in_batch=None):
            t = time.perf_counter()
            self._in_loss = 0.0
            out = super().training_step(model, inputs, num_items_in_batch)
            whole = time.perf_counter() - t
            probe._cur["forward_loss"] += self._in_loss
            probe._cur["backward"] += whole - self._in_loss
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            t = time.perf_counter()
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self._in_loss = getattr(self, "_in_loss", 0.0) + time.perf_counter() - t
            return out

    Timed.__name__ = f"Timed{trainer_cls.__name__}"
    return Timed
