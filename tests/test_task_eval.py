"""`tune --eval-task [TASK:]FILE --eval-every N --keep-best`: the model in training answers a benchmark every N
steps with eval's own code; the score (with its 95% interval) is logged beside the loss and in eval_history.json, and
--keep-best leaves the run with the best checkpoint's weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli_captured, tiny_recipe
from safetensors.torch import load_file

from qilin_lite.errors import UserError
from qilin_lite.eval.run import run_benchmark
from qilin_lite.train.stage import run_stage


def _task_recipe(out, tiny_data, align_run, mode="lora", **extra):
    return tiny_recipe("tune", mode, out, tiny_data["tune"], tiny_data["images"],
                       **{"model.from_run": str(align_run), "train.max_steps": 4,
                          "data.eval_task": str(tiny_data["heldout"]), "data.eval_task_images": str(tiny_data["images"]),
                          "train.eval_every": 2, **extra})


@pytest.mark.slow
def test_the_logged_score_is_evals_score_of_those_weights(tiny_data, align_run, tmp_path):
    out = run_stage(_task_recipe(tmp_path / "tune", tiny_data, align_run))
    history = json.loads((out / "eval_history.json").read_text(encoding="utf-8"))
    assert [h["step"] for h in history] == [2, 4] and all(h["metric"] == "accuracy" and h["n"] == 8 for h in history)
    logged = [h for h in json.loads((out / "log_history.json").read_text(encoding="utf-8")) if "task_accuracy" in h]
    assert [h["step"] for h in logged] == [2, 4]
    assert all(h["task_accuracy_ci_low"] <= h["task_accuracy"] <= h["task_accuracy_ci_high"] for h in logged)
    # the finished run holds the last step's weights: `qilin-lite eval` on it gives the score logged at that step
    scored = run_benchmark(tiny_data["heldout"], "llava", tmp_path / "eval", model=str(out),
                           image_folder=tiny_data["images"], dtype="float32", attn="sdpa")
    assert scored["groups"]["all"]["accuracy"] == history[-1]["value"] == logged[-1]["task_accuracy"]
    assert history[-1]["metrics"]["ci95"] == scored["groups"]["all"]["ci95"]
    # answering in the middle of training changes nothing it trains: the same weights as a run without it
    plain = run_stage(tiny_recipe("tune", "lora", tmp_path / "plain", tiny_data["tune"], tiny_data["images"],
                                  **{"model.from_run": str(align_run), "train.max_steps": 4}))
    a, b = load_file(out / "adapter_model.safetensors"), load_file(plain / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("mode, weights", [("lora", "adapter_model.safetensors"), ("full", "model.safetensors")])
def test_keep_best_keeps_that_checkpoint_and_its_weights(tiny_data, align_run, tmp_path, monkeypatch, mode, weights):
    """Scores scripted 0.2, 0.9, 0.4, 0.1 at steps 1-4: step 2's checkpoint survives rotation (save_total_limit 2, the latest is step 4's)
    and the finished run's weights are that checkpoint's, not the last step's (a --full checkpoint is saved under the
    release's names, which the Trainer's own reload does not map back)."""
    import qilin_lite.eval.metrics as metrics

    real, scripted = metrics.aggregate, iter([0.2, 0.9, 0.4, 0.1])

    def aggregate(items, answers):
        out = real(items, answers)
        out["groups"]["all"]["accuracy"] = next(scripted)
        return out

    monkeypatch.setattr(metrics, "aggregate", aggregate)
    out = run_stage(_task_recipe(tmp_path / "tune", tiny_data, align_run, mode, **{
        "train.eval_every": 1, "train.keep_best": True, "train.save_total_limit": 2, "train.save_steps": 4}))
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-1").exists()  # the best, kept beside the latest
    best = load_file(out / "checkpoint-2" / weights)
    final = load_file(out / weights)
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)
    last = load_file(out / "checkpoint-4" / weights)
    assert any(not torch.equal(last[k], final[k]) for k in last)
    assert [h["value"] for h in json.loads((out / "eval_history.json").read_text())] == [0.2, 0.9, 0.4, 0.1]


def test_flags_are_checked_before_any_work(tiny_data, align_run, tmp_path, monkeypatch, capsys):
    base = ["tune", "--lora", "--from", align_run, "--data", tiny_data["tune"], "--image-folder", tiny_data["images"],
            "--set", "model.dtype=float32"]
    for extra, says in (
        (["--keep-best"], "--keep-best keeps the best checkpoint by the task metric: give --eval-task"),
        (["--eval-every", "2"], "--eval-every 2 scores a benchmark while training, and none is named"),
        (["--eval-task", tmp_path / "none.json"], "no such benchmark file"),
        (["--eval-task", f"slake:{tiny_data['heldout']}"], "heldout"),  # not SLAKE's layout: eval's own one line
        (["--eval-task", tiny_data["heldout"], "--eval-every", "-1"], "train.eval_every"),
        (["--eval-task", tiny_data["heldout"], "--set", "train.eval_task_metric=rougeL"],
         "train.eval_task_metric rougeL: the benchmark's questions give accuracy"),
    ):
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        code, _, err = run_cli_captured(monkeypatch, capsys, *base, "--out", out, *map(str, extra))
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert code == 2 and len(lines) == 1 and says in lines[0], (extra, err)
        assert not out.exists() or not any(out.iterdir())
    for extra, says in ((["--packing"], "--eval-task with --packing"),):
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        code, _, err = run_cli_captured(monkeypatch, capsys, *base, "--out", out, "--eval-task",
                                        str(tiny_data["heldout"]), *extra)
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert code == 2 and len(lines) == 1 and says in lines[0], (extra, err)
    with pytest.raises(UserError, match="align run"):
        run_stage(tiny_recipe("align", "align", tmp_path / "a", tiny_data["align"], tiny_data["images"],
                              **{"data.eval_task": str(tiny_data["heldout"])}))


@pytest.mark.slow
def test_keep_best_after_a_resume_holds_the_best_step(tiny_data, align_run, tmp_path, monkeypatch):
    """A run that crashed after evaluating step 5 resumes from its last checkpoint (step 4's, the best): step 5 is
    scored again by the resumed run rather than taken from the stopped run's history, and the weights kept are the
    best step's."""
    import qilin_lite.eval.metrics as metrics
    from qilin_lite.train.trainer import QilinTrainer

    real, scripted = metrics.aggregate, iter([0.2, 0.3, 0.5, 0.9, 0.1, 0.15, 0.1])

    def aggregate(items, answers):
        out = real(items, answers)
        out["groups"]["all"]["accuracy"] = next(scripted)
        return out

    class Crash(QilinTrainer):
        def training_step(self, *a, **k):
            if self.state.global_step == 5:
                raise KeyboardInterrupt("the machine went away")
            return super().training_step(*a, **k)

    monkeypatch.setattr(metrics, "aggregate", aggregate)
    recipe = _task_recipe(tmp_path / "tune", tiny_data, align_run, **{
        "train.max_steps": 6, "train.eval_every": 1, "train.keep_best": True, "train.save_steps": 3,
        "train.save_total_limit": 2})
    with pytest.raises(KeyboardInterrupt):
        run_stage(recipe, trainer_cls=Crash)
    out = run_stage(recipe, resume=True)
    history = json.loads((out / "eval_history.json").read_text(encoding="utf-8"))
    assert [(h["step"], h["value"]) for h in history] == [(1, 0.2), (2, 0.3), (3, 0.5), (4, 0.9), (5, 0.15), (6, 0.1)]
    best = load_file(out / "checkpoint-4" / "adapter_model.safetensors")
    final = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(best[k], final[k]) for k in best)


@pytest.mark.slow
def test_a_bf16_lora_run_answers_under_the_trainers_autocast(tiny_data, align_run, tmp_path):
    """bf16 weights with the fp32 trained projector (the recipes' default dtype): generate goes around accelerate's
    autocast on the model's forward, so the callback answers inside the trainer's own autocast."""
    out = run_stage(_task_recipe(tmp_path / "tune", tiny_data, align_run, **{
        "model.dtype": "bfloat16", "train.max_steps": 2}))
    history = json.loads((out / "eval_history.json").read_text(encoding="utf-8"))
    assert [h["step"] for h in history] == [2] and 0 <= history[0]["value"] <= 1
    rows = json.loads((out / "log_history.json").read_text(encoding="utf-8"))
    # the task row is its own: the step's training metrics stay on the loss row
    task_rows = [r for r in rows if "task_accuracy" in r]
    assert task_rows and all("entropy" not in r and "loss" not in r for r in task_rows)
    assert any("entropy" in r and "loss" in r for r in rows)


@pytest.mark.parametrize("broken", ['{"step": 1', '[{"step": "one"}]'], ids=["cut-off", "wrong-shape"])
def test_a_resume_over_an_unreadable_history_keeps_it_aside(tiny_data, align_run, tmp_path, caplog, broken):
    """A stopped run's eval_history.json that no longer reads (cut off, hand-edited) does not stop the resume with a
    traceback: it is kept under another name with one warning, and the resumed run writes its own history."""
    import logging

    from qilin_lite.train.trainer import QilinTrainer

    class Crash(QilinTrainer):
        def training_step(self, *a, **k):
            if self.state.global_step == 3:
                raise KeyboardInterrupt("the machine went away")
            return super().training_step(*a, **k)

    recipe = _task_recipe(tmp_path / "tune", tiny_data, align_run, **{
        "train.max_steps": 4, "train.eval_every": 2, "train.save_steps": 2})
    with pytest.raises(KeyboardInterrupt):
        run_stage(recipe, trainer_cls=Crash)
    (tmp_path / "tune" / "eval_history.json").write_text(broken, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="qilin_lite.train.task_eval"):
        out = run_stage(recipe, resume=True)
    assert (out / "eval_history.json.unreadable").read_text(encoding="utf-8") == broken
    assert [h["step"] for h in json.loads((out / "eval_history.json").read_text(encoding="utf-8"))] == [4]
    assert any("not a task-evaluation history" in r.getMessage() for r in caplog.records)
