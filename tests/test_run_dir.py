"""One run trains into an output directory at a time, a finished model or a folder of the user's is never replaced
silently, and --resume never continues with other data or settings (however their paths are spelled)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli_captured, tiny_recipe

from qilin_lite.errors import UserError
from qilin_lite.train import run_dir
from qilin_lite.train.stage import run_stage

HERE = Path(__file__).parent


@pytest.fixture
def finished(tmp_path, align_run, tiny_data):
    def recipe(**extra):
        return tiny_recipe("tune", "lora", tmp_path / "run", tiny_data["tune"], tiny_data["images"],
                           **{"model.from_run": str(align_run), **extra})

    out = run_stage(recipe())
    return out, recipe


def adapter(out):
    return (out / "adapter_model.safetensors").read_bytes()


def test_a_finished_run_is_refused_then_replaced_only_with_overwrite(finished, monkeypatch, capsys, tiny_data,
                                                                      align_run):
    out, recipe = finished
    before = adapter(out)
    args = ["tune", "--lora", "--from", align_run, "--data", tiny_data["tune"], "--image-folder", tiny_data["images"],
            "--out", out, "--set", "train.max_steps=1", "--set", "model.dtype=float32", "--set", "train.bf16=false"]
    code, _, err = run_cli_captured(monkeypatch, capsys, *args)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: {out}: holds a finished run; choose another --out, or pass " \
                                           "--overwrite to replace it"
    assert adapter(out) == before
    (out / "stale.txt").write_text("from the old run")
    run_stage(recipe(**{"train.lr": 5e-2}), overwrite=True)
    assert adapter(out) != before and not (out / "stale.txt").exists()  # nothing of the old run left beside it
    with pytest.raises(UserError, match="pass one of them"):
        run_stage(recipe(), resume=True, overwrite=True)


def test_overwrite_replaces_runs_only(tmp_path, tiny_data, align_run):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("years of work")
    r = tiny_recipe("tune", "lora", tmp_path / "notes", tiny_data["tune"], tiny_data["images"],
                    **{"model.from_run": str(align_run)})
    with pytest.raises(UserError, match="not a qilin-lite training output"):
        run_stage(r, overwrite=True)
    assert (tmp_path / "notes" / "thesis.tex").exists()


def test_resume_with_other_settings_or_data_names_the_difference(finished, tmp_path):
    out, recipe = finished
    before = (adapter(out), (out / "recipe.yaml").read_text(), (out / "train_summary.json").read_text())
    other = tmp_path / "other.json"  # other data under another name (the same data under another name resumes)
    other.write_text(json.dumps(json.loads(open(recipe().data.train, encoding="utf-8").read())[:-1]), encoding="utf-8")
    with pytest.raises(UserError, match=r"--resume with other settings or data .*train\.epochs: 1\.0 -> 2\.0"):
        run_stage(recipe(**{"train.epochs": 2}), resume=True)
    with pytest.raises(UserError, match=r"data\.train: '.*tune\.json' -> '.*other\.json'"):
        run_stage(recipe(**{"data.train": str(other)}), resume=True)
    assert (adapter(out), (out / "recipe.yaml").read_text(), (out / "train_summary.json").read_text()) == before
    # the same file name, other contents
    records = json.loads(open(recipe().data.train, encoding="utf-8").read())
    data = tmp_path / "copy.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    run2 = tmp_path / "run2"
    first = tiny_recipe("tune", "lora", run2, data, recipe().data.image_folder,
                        **{"model.from_run": recipe().model.from_run, "train.save_steps": 1})
    run_stage(first)
    data.write_text(json.dumps(records[:-1], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UserError, match=r"data\.train: the file's contents changed"):
        run_stage(first, resume=True)
    # settings that only change reporting may differ; the same inputs resume
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    first.train.logging_steps = 2
    assert run_stage(first, resume=True) == run2


# Two `qilin-lite tune` processes with their libraries imported, started by one signal half a second apart: the
# interpreter start-up (seconds, and uneven on a busy machine) no longer decides which reaches --out first or whether
# they overlap at all.
TWO_RUNS = r"""
import json, sys, time
from pathlib import Path
import qilin_lite.train.stage  # torch, transformers, trl, peft: imported before the start signal
from qilin_lite.cli import main
ready, go, delay, args = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])
ready.touch()
while not go.exists():
    time.sleep(0.01)
time.sleep(delay)
sys.argv = ["qilin-lite", *args]
main()
"""


def tune_args(out, align_run, tiny_data, steps: int) -> list[str]:
    return ["tune", "--lora", "--from", str(align_run), "--data", str(tiny_data["tune"]), "--image-folder",
            str(tiny_data["images"]), "--out", str(out), *[a for kv in (
                "model.dtype=float32", "model.attn=sdpa", "train.bf16=false", "train.tf32=false",
                "train.gradient_checkpointing=false", "data.num_workers=0", "train.global_batch=4",
                "train.per_device_batch=4", f"train.max_steps={steps}", "train.save_steps=1000", "train.lora_r=4",
                "train.lora_alpha=8", "data.max_length=256") for a in ("--set", kv)]]


@pytest.mark.slow
def test_two_runs_into_one_out_one_is_refused_at_once(tmp_path, align_run, tiny_data):
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    go = tmp_path / "go"
    procs = []
    for i, (steps, delay) in enumerate(((2, 0.0), (3, 0.5))):  # told apart by their step counts
        ready = tmp_path / f"ready{i}"
        p = subprocess.Popen([sys.executable, "-c", TWO_RUNS, str(ready), str(go), str(delay),
                              json.dumps(tune_args(out, align_run, tiny_data, steps))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        procs.append((p, ready, steps))
    try:
        for p, ready, _ in procs:
            while not ready.exists():
                assert p.poll() is None, p.communicate()[1][-3000:]
                time.sleep(0.05)
        go.touch()
        results = [(p.communicate(timeout=600), p.returncode, steps) for p, _, steps in procs]
    finally:
        for p, _, _ in procs:
            p.kill()
    assert sorted(rc for _, rc, _ in results) == [0, 2], [(rc, err[-3000:]) for (_, err), rc, _ in results]
    [((won_out, _), _, won_steps)] = [r for r in results if r[1] == 0]
    [((_, lost_err), _, _)] = [r for r in results if r[1] == 2]
    assert "tune done" in won_out and "Traceback" not in lost_err
    errors = [line for line in lost_err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {out}: another run is training into this directory")
    assert errors[0].endswith("wait for it to end, or choose another --out")
    # everything in --out is the winner's: its recipe, its training, and no lock left behind
    assert f"max_steps: {won_steps}\n" in (out / "recipe.yaml").read_text(encoding="utf-8")
    assert json.loads((out / "train_summary.json").read_text())["steps"] == won_steps
    assert (out / "adapter_model.safetensors").is_file() and not (out / run_dir.LOCK).exists()


def test_a_killed_run_leaves_no_lock_behind(tmp_path):
    out = tmp_path / "run"
    hold = ("import sys, time; from pathlib import Path; from qilin_lite.train import run_dir; "
            "run_dir.claim(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"another run is training into this directory \(process {holder.pid} on"):
            run_dir.claim(out)
    finally:
        holder.kill()  # SIGKILL: nothing of the holder's runs, the kernel drops its lock
        holder.wait()
    assert (out / run_dir.LOCK).exists()
    run_dir.claim(out)
    run_dir.release(out)
    assert not (out / run_dir.LOCK).exists()


def test_a_folder_of_the_users_is_never_trained_into(tmp_path, tiny_data, align_run, monkeypatch, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    args = tune_args(mine, align_run, tiny_data, 2)
    for extra in ([], ["--resume"]):
        code, _, err = run_cli_captured(monkeypatch, capsys, *args, *extra)
        assert code == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1] == f"error: {mine}: not empty and not a qilin-lite run (nothing in it " \
                                               "was changed); choose a new or empty --out"
    assert [p.name for p in mine.iterdir()] == ["README.md"] and (mine / "README.md").read_text() == "my notes"
    # nor is it joined into by `base`
    code, _, err = run_cli_captured(monkeypatch, capsys, "base", "--out", mine, "--vision", "x", "--llm", "y")
    assert code == 2 and "not empty" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert [p.name for p in mine.iterdir()] == ["README.md"]


def test_resume_knows_a_data_file_by_its_contents_not_its_spelling(tmp_path, tiny_data, align_run, monkeypatch):
    data = Path(tiny_data["tune"])
    monkeypatch.chdir(data.parent)

    def recipe(train):
        return tiny_recipe("tune", "lora", tmp_path / "run", train, tiny_data["images"],
                           **{"model.from_run": str(align_run)})

    run_dir.prepare(recipe(data.name), resume=False)  # `--data tune.json`, as a user in that folder types it
    run_dir.release(tmp_path / "run")
    for same in (str(data.resolve()), f"./{data.name}", shutil.copy(data, tmp_path / "moved.json")):
        assert run_dir.prepare(recipe(same), resume=True) == tmp_path / "run"
        run_dir.release(tmp_path / "run")
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(json.loads(data.read_text(encoding="utf-8"))[:-1]), encoding="utf-8")
    with pytest.raises(UserError, match=r"data\.train: '.*moved\.json' -> '.*changed\.json'"):
        run_dir.prepare(recipe(str(changed)), resume=True)
    assert not (tmp_path / "run" / run_dir.LOCK).exists()  # a refused start gives the directory back
