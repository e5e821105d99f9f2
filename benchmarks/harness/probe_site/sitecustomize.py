"""A step profile for any transformers Trainer, loaded by Python itself when this folder is on PYTHONPATH.

vs_llamafactory.py runs both tools from their own command lines with this folder on PYTHONPATH and QL_PROBE=FILE,
so both are timed by the same code: per optimizer step, the wait for the batch (`Trainer.get_batch_samples`), the
forward and loss (the trainer's own `compute_loss`, whatever subclass it is), the backward
(`Accelerator.backward`), the optimizer step (accelerate's optimizer wrapper) and the rest of the step (clipping,
scheduler, callbacks, logging, host work), as the time from one batch fetch to the next less those parts. Medians
per part go to FILE as JSON when the process exits. Only `time.perf_counter` is added to the step.

With QL_PROBE_OPS=N as well, torch.profiler records steps N to N+2 and their operators, by self CPU time, go to
FILE.ops.txt (those steps then run slower: a look at where the time goes, not a timing).
"""

import os

if os.environ.get("QL_PROBE"):
    import atexit
    import json
    import statistics
    import time

    import accelerate
    import accelerate.optimizer
    import transformers

    _steps: list[dict] = []
    _cur: dict = {}

    def _timed(fn, part):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _cur[part] = _cur.get(part, 0.0) + time.perf_counter() - t
        return wrapper

    _fetch = transformers.Trainer.get_batch_samples

    _ops_at = int(os.environ.get("QL_PROBE_OPS", "0"))
    _prof: list = []

    def _ops(step: int) -> None:
        import torch

        if step == _ops_at:
            _prof.append(torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]))
            _prof[0].__enter__()
        elif step == _ops_at + 3 and _prof:
            _prof[0].__exit__(None, None, None)
            with open(os.environ["QL_PROBE"] + ".ops.txt", "w", encoding="utf-8") as f:
                f.write(_prof[0].key_averages().table(sort_by="self_cpu_time_total", row_limit=40,
                                                      max_name_column_width=70))

    def get_batch_samples(self, *args, **kwargs):
        if _ops_at:
            _ops(len(_steps) + 1)
        now = time.perf_counter()
        if "start" in _cur:  # close the previous step: everything since its fetch began
            _steps.append({**_cur, "step": now - _cur.pop("start")})
            _cur.clear()
        if not getattr(self, "_ql_probed", False):  # the subclass's own compute_loss, bound to this trainer
            self.compute_loss = _timed(self.compute_loss, "forward_loss")
            self._ql_probed = True
        _cur["start"] = now
        return _timed(_fetch, "data")(self, *args, **kwargs)

    transformers.Trainer.get_batch_samples = get_batch_samples
    accelerate.Accelerator.backward = _timed(accelerate.Accelerator.backward, "backward")
    accelerate.optimizer.AcceleratedOptimizer.step = _timed(accelerate.optimizer.AcceleratedOptimizer.step,
                                                            "optimizer")

    @atexit.register
    def _write():
        steps = [s for s in _steps if "forward_loss" in s][1:]  # the first step warms up
        if not steps:
            return
        parts = ("data", "forward_loss", "backward", "optimizer")
        med = {p: statistics.median(s.get(p, 0.0) for s in steps) for p in (*parts, "step")}
        med["other"] = statistics.median(s["step"] - sum(s.get(p, 0.0) for p in parts) for s in steps)
        with open(os.environ["QL_PROBE"], "w", encoding="utf-8") as f:
            json.dump({"steps": len(steps), "median_s": med}, f)
