"""A finished model is never replaced silently, and --resume never continues with other data or settings."""

import json
import shutil

import pytest
from conftest import run_cli_captured, tiny_recipe

from qilin_lite.errors import UserError
from qilin_lite.train.stage import run_stage


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
    other = tmp_path / "other.json"
    shutil.copy(recipe().data.train, other)
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
