"""Resume is exact in any epoch: a run killed inside its second epoch (SIGKILL, or SIGTERM as clusters preempt) and
resumed ends with the same weights, bit for bit, as the run that was never stopped."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

# 16 records, batch 4 (2 x accumulation 2): 4 steps an epoch, 8 in all; checkpoints at 5 (inside epoch 2), logging
# every 3 steps so that logging and saving never line up with the stop
SETTINGS = {"train.epochs": 2, "train.max_steps": -1, "train.global_batch": 4, "train.per_device_batch": 2,
            "train.save_steps": 5, "train.logging_steps": 3, "train.lora_dropout": 0.1, "train.lr": 5e-3}

PROBE = r"""
import os, signal, sys, json
sys.path.insert(0, sys.argv[1])
from conftest import tiny_recipe
from qilin_lite.train.trainer import QilinTrainer
extra, at, sig = json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
class Killing(QilinTrainer):
    def training_step(self, *a, **k):
        if self.state.global_step == at:
            os.kill(os.getpid(), getattr(signal, sig))
            if sig == "SIGKILL":
                signal.pause()
        return super().training_step(*a, **k)
from qilin_lite.cli import _run
r = tiny_recipe(**extra)
done = _run(r, False, trainer_cls=Killing)
print("done" if done else "stopped")
"""


def _recipe_args(tiny_base, tiny_data, out, grouped):
    return {"stage": "tune", "mode": "lora", "out": str(out), "data": str(tiny_data["tune"]),
            "images": str(tiny_data["images"]),
            **{**SETTINGS, "model.base": str(tiny_base), "data.group_by_length": grouped}}


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def _interrupted(tmp_path, args, at: int, sig: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", PROBE, str(HERE), json.dumps(args), str(at), sig],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_base, tiny_data):
    """The uninterrupted runs (one per sampling order), on one thread as the interrupted runs (`_interrupted`): the
    CPU's matrix products split their work by the thread count and the shape, so "to the bit" holds for the same
    machine settings (the loss head's products over the supervised positions differ in the last bit between one
    thread and two)."""
    from conftest import tiny_recipe

    from qilin_lite.train.stage import run_stage

    outs = {}
    with _one_thread():
        for grouped in (True, False):
            out = tmp_path_factory.mktemp("ref") / "run"
            pos, kw = _tiny_kwargs(_recipe_args(tiny_base, tiny_data, out, grouped))
            run_stage(tiny_recipe(*pos, **kw))
            outs[grouped] = out
    return outs


@contextlib.contextmanager
def _one_thread():
    """In-process runs on one thread, as `_interrupted`'s subprocess (OMP_NUM_THREADS=1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tiny_kwargs(args):
    a = dict(args)
    return (a.pop("stage"), a.pop("mode"), Path(a.pop("out")), a.pop("data"), a.pop("images")), a


@pytest.mark.slow
@pytest.mark.parametrize("grouped", [True, False], ids=["length-grouped", "random"])
def test_killed_in_the_second_epoch_resumes_to_the_same_weights(tmp_path, tiny_base, tiny_data, reference, grouped):
    from conftest import tiny_recipe

    from qilin_lite.train.stage import run_stage

    out = tmp_path / "run"
    args = _recipe_args(tiny_base, tiny_data, out, grouped)
    pos, kw = _tiny_kwargs(args)
    probe_args = {"stage": pos[0], "mode": pos[1], "out": pos[2], "data": pos[3], "images": pos[4], **kw}
    probe_args["out"] = str(probe_args["out"])
    r = _interrupted(tmp_path, probe_args, 6, "SIGKILL")
    assert r.returncode == -9, r.stderr[-2000:]
    assert (out / "checkpoint-5").is_dir() and not (out / "qilin.json").exists()
    with _one_thread():
        run_stage(tiny_recipe(*pos, **kw), resume=True)
    ref, got = _weights(reference[grouped]), _weights(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert (ref[k] == got[k]).all(), k  # bit for bit


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_exits_0_and_resumes(tmp_path, tiny_base, tiny_data, reference):
    from conftest import tiny_recipe

    from qilin_lite.train.stage import run_stage

    out = tmp_path / "run"
    pos, kw = _tiny_kwargs(_recipe_args(tiny_base, tiny_data, out, True))
    probe_args = {"stage": pos[0], "mode": pos[1], "out": str(pos[2]), "data": pos[3], "images": pos[4], **kw}
    r = _interrupted(tmp_path, probe_args, 6, "SIGTERM")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stopped by SIGTERM after step 7" in r.stderr and "--resume" in r.stderr
    assert r.stdout.strip().endswith("stopped")
    assert (out / "checkpoint-7" / ".qilin-complete").exists() and not (out / "qilin.json").exists()
    with _one_thread():
        run_stage(tiny_recipe(*pos, **kw), resume=True)
    ref, got = _weights(reference[True]), _weights(out)
    for k in ref:
        assert (ref[k] == got[k]).all(), k


@pytest.mark.slow
def test_a_full_run_killed_resumes_to_the_same_weights(tmp_path, tiny_base, tiny_data):
    """--full checkpoints are saved under the release's key names; the Trainer's own reload maps none of them back
    and went on from the base weights without an error (fails without trainer.load_full_checkpoint)."""
    from conftest import tiny_recipe
    from safetensors.torch import load_file

    from qilin_lite.train.stage import run_stage

    args = {**_recipe_args(tiny_base, tiny_data, tmp_path / "ref", True), "mode": "full", "train.lr": 1e-3}
    pos, kw = _tiny_kwargs(args)
    with _one_thread():
        run_stage(tiny_recipe(*pos, **kw))
    out = tmp_path / "run"
    args["out"] = str(out)
    r = _interrupted(tmp_path, args, 6, "SIGKILL")
    assert r.returncode == -9, r.stderr[-2000:]
    assert (out / "checkpoint-5" / "model.safetensors").is_file()
    pos, kw = _tiny_kwargs(args)
    with _one_thread():
        run_stage(tiny_recipe(*pos, **kw), resume=True)
    ref, got = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert (ref[k] == got[k]).all(), k


def test_a_full_checkpoint_of_another_model_is_one_line(tmp_path, tiny_base):
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    from qilin_lite.errors import UserError
    from qilin_lite.train.trainer import load_full_checkpoint

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_base))
    model.save_pretrained(tmp_path)
    state = load_file_all(tmp_path / "model.safetensors")
    state.pop(next(k for k in state if "multi_modal_projector" in k))
    state["something.else"] = next(iter(state.values())).clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"does not match the model \(1 weights missing, e\.g\. "
                                        r"model\.multi_modal_projector.*1 unknown, e\.g\. something\.else"):
        load_full_checkpoint(model, tmp_path)


def load_file_all(path):
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(path)).items()}


def test_resume_skips_a_checkpoint_cut_short_while_saving(tmp_path, caplog):
    from qilin_lite.errors import UserError
    from qilin_lite.train.trainer import COMPLETE, last_checkpoint

    for n in (5, 10, 15):
        (tmp_path / f"checkpoint-{n}").mkdir()
    (tmp_path / "checkpoint-5" / COMPLETE).write_text("")
    (tmp_path / "checkpoint-10" / COMPLETE).write_text("")
    with caplog.at_level("WARNING"):
        assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert "checkpoint-15 is incomplete" in caplog.text and "resuming from checkpoint-10" in caplog.text
    for n in (5, 10):
        (tmp_path / f"checkpoint-{n}" / COMPLETE).unlink()
    with pytest.raises(UserError, match="no complete checkpoint"):
        last_checkpoint(tmp_path)
