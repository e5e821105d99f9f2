"""Each bad input gives one line naming the file, the record and the fix; --skip-bad sets records aside instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qilin_lite.config import load_recipe
from qilin_lite.data.records import Reject, read_records
from qilin_lite.errors import UserError

GOOD = {"id": "a1", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\n病灶位于哪一侧？"},
                                                      {"from": "gpt", "value": "左侧"}]}


@pytest.fixture
def folder(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (120, 10, 10)).save(tmp_path / "x.png")
    return tmp_path


def write_jsonl(path: Path, rows) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def variant(**kw):
    r = json.loads(json.dumps(GOOD))
    r.update(kw)
    return r


CASES = {
    "missing image": (variant(id="b2", image="nope.png"), "nope.png' not found"),
    "image count": (variant(id="b2", conversations=[{"from": "human", "value": "问题"}, {"from": "gpt", "value": "答"}]),
                    "0 '<image>' tag(s) but the record has 1 image"),
    "empty reply": (variant(id="b2", conversations=[{"from": "human", "value": "<image>\n问"}, {"from": "gpt", "value": "  "}]),
                    "empty reply"),
    "roles": (variant(id="b2", conversations=[{"from": "gpt", "value": "答"}, {"from": "human", "value": "<image>\n问"}]),
              "roles must alternate"),
    "not json": ('{"id": "b2", "image": ', "not valid JSON"),
    # the authors' code masks such a record whole (its prompt renders `USER:ASSISTANT:`): nothing to learn from it
    "empty later question": (variant(id="b2", conversations=[
        {"from": "human", "value": "<image>\n问"}, {"from": "gpt", "value": "答"},
        {"from": "human", "value": ""}, {"from": "gpt", "value": "再答"}]), "turn 3 is an empty question"),
    "image outside the folder": (variant(id="b2", image="../x.png"), "outside the image folder"),
    "absolute image path": (variant(id="b2", image="/etc/hostname"), "outside the image folder"),
    "duplicate id": (variant(id="a1"), "duplicate id 'a1'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_names_file_line_id_and_problem(case, folder):
    row, problem = CASES[case]
    data = write_jsonl(folder / "训练数据.jsonl", [GOOD, row])
    with pytest.raises(UserError) as e:
        read_records(data, folder)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{data}:2")
    assert problem in msg
    assert "--skip-bad" in msg
    if case != "not json":
        assert "(" in msg and ("b2" in msg or "a1" in msg)


def test_skip_bad_sets_records_aside_with_reasons(folder):
    rows = [GOOD] + [dict(CASES[c][0], id=f"bad{i}") if isinstance(CASES[c][0], dict) else CASES[c][0]
                     for i, c in enumerate(sorted(CASES)) if c != "duplicate id"]
    data = write_jsonl(folder / "d.jsonl", rows)
    rejects: list[Reject] = []
    recs = read_records(data, folder, skip_bad=True, rejects=rejects)
    assert [r.id for r in recs] == ["a1"]
    assert len(rejects) == len(CASES) - 1
    assert sorted(r.line for r in rejects) == list(range(2, len(CASES) + 1))


def test_corrupt_image_is_caught_before_training(folder):
    from qilin_lite.train.data import verify_images

    (folder / "bad.png").write_bytes((folder / "x.png").read_bytes()[:40])  # truncated PNG
    data = write_jsonl(folder / "d.jsonl", [GOOD, variant(id="c3", image="bad.png")])
    recs = read_records(data, folder)
    with pytest.raises(UserError) as e:
        verify_images(recs, [], skip_bad=False)
    assert f"{data}:2 (c3)" in str(e.value) and "bad.png" in str(e.value)
    rejects: list[Reject] = []
    kept = verify_images(recs, rejects, skip_bad=True)
    assert [r.id for r in kept] == ["a1"] and rejects[0].id == "c3"


def test_a_sample_failing_mid_epoch_is_skipped_and_recorded(tiny_base, folder, tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import AutoConfig

    from qilin_lite.families import TEMPLATES
    from qilin_lite.model import load_tokenizer_and_processor, token_layout
    from qilin_lite.images.pixel_values import ImageLoader
    from qilin_lite.train.dataset import VisionTextDataset

    Image.new("RGB", (32, 32)).save(folder / "y.png")
    data = write_jsonl(folder / "d.jsonl", [GOOD, variant(id="y", image="y.png")])
    recs = read_records(data, folder)
    (folder / "x.png").unlink()  # the file vanishes after validation (a flaky mount)
    tok, ip = load_tokenizer_and_processor(str(tiny_base))
    rejects = tmp_path / "rejects.jsonl"
    ds = VisionTextDataset(recs, tok, ImageLoader(ip), TEMPLATES["vicuna_v1"],
                           token_layout(AutoConfig.from_pretrained(tiny_base), 256), np.array([10, 10]), rejects)
    item = ds[0]  # a1 fails, y is served instead
    assert item["pixel_values"].shape[0] == 1
    row = json.loads(rejects.read_text(encoding="utf-8").splitlines()[0])
    assert row["id"] == "a1" and row["during"] == "training"


def test_unknown_recipe_key_is_an_error_naming_file_and_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stage: align\ntrain:\n  lr: 1e-3\n  learning_rate: 2e-5\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_recipe(p)
    assert str(p) in str(e.value) and "train.learning_rate" in str(e.value)
    with pytest.raises(UserError, match="train.lrr"):
        load_recipe(None, ["train.lrr=1"])
    with pytest.raises(UserError, match="must be int"):
        load_recipe(None, ["train.global_batch=abc"])


def run_cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "qilin_lite", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def test_cli_user_errors_are_one_line_without_traceback(folder, tiny_base):
    data = write_jsonl(folder / "d.jsonl", [GOOD, CASES["missing image"][0]])
    r = run_cli("align", "--data", str(data), "--image-folder", str(folder), "--out", str(folder / "out"),
                "--model", str(tiny_base), "--set", "model.dtype=float32")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and f"{data}:2 (b2)" in err[0] and "not found" in err[0]
    r = run_cli("tune", "--full", "--lora", "--data", str(data), "--out", str(folder / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "choose one of" in r.stderr


@pytest.mark.parametrize("bad", ["records", "images"])
def test_when_every_record_is_rejected_the_rejects_file_it_names_exists(bad, folder, tiny_base, tmp_path):
    from conftest import tiny_recipe

    from qilin_lite.train.stage import run_stage

    if bad == "records":  # rejected while reading
        rows = [variant(id=f"r{i}", image="nope.png") for i in range(3)]
    else:  # read fine, rejected when the images are decoded
        (folder / "bad.png").write_bytes((folder / "x.png").read_bytes()[:40])
        rows = [variant(id=f"r{i}", image="bad.png") for i in range(3)]
    data = write_jsonl(folder / "d.jsonl", rows)
    out = tmp_path / "run"
    recipe = tiny_recipe("tune", "lora", out, data, folder, **{"model.base": str(tiny_base), "data.skip_bad": True})
    with pytest.raises(UserError, match="rejects.jsonl"):
        run_stage(recipe)
    listed = [json.loads(line)["id"] for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert listed == ["r0", "r1", "r2"]


@pytest.mark.parametrize("bad", ["two captions", "cut to nothing"])
def test_a_record_the_template_or_the_cut_cannot_train_is_one_line(bad, folder, tiny_base, tmp_path, monkeypatch,
                                                                    capsys):
    """`plain` with several replies, or a reply the cut removes entirely: one line naming file, line, id and fix;
    no output directory that claims to be a finished run; --skip-bad trains on the rest."""
    from conftest import run_cli_captured

    if bad == "two captions":
        odd = variant(id="b2", conversations=GOOD["conversations"] + [{"from": "human", "value": "再描述"},
                                                                     {"from": "gpt", "value": "右侧"}])
        args, want = ["align", "--set", "data.template=plain"], "one caption per record, this one has 2 replies"
    else:
        odd = variant(id="b2", conversations=[{"from": "human", "value": "<image>\n" + "病灶位于哪一侧？" * 60},
                                              GOOD["conversations"][1]])
        args, want = ["tune", "--full", "--set", "data.max_length=64"], "no reply token is left to learn from"
    data = write_jsonl(folder / "d.jsonl", [variant(id=f"g{i}") for i in range(3)] + [odd])
    out = tmp_path / "run"
    common = ["--data", data, "--image-folder", folder, "--model", tiny_base, "--set",
              "model.dtype=float32", "--set", "model.attn=sdpa", "--set", "train.bf16=false", "--set",
              "train.gradient_checkpointing=false", "--set", "train.global_batch=2", "--set", "train.per_device_batch=2",
              "--set", "train.max_steps=1", "--set", "data.num_workers=0", "--set", "train.tf32=false"]
    code, stdout, stderr = run_cli_captured(monkeypatch, capsys, *args, *common, "--out", out)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"{data}:4 (b2)" in lines[0] and want in lines[0] and "--skip-bad" in lines[0]
    assert not (out / "qilin.json").exists()  # nothing that claims to be a finished run
    code, stdout, stderr = run_cli_captured(monkeypatch, capsys, *args, *common, "--skip-bad", "--out",
                                            tmp_path / "run2")
    assert code == 0, stderr
    assert [json.loads(x)["id"] for x in (tmp_path / "run2/rejects.jsonl").read_text().splitlines()] == ["b2"]


def test_an_image_name_the_file_system_cannot_hold_is_that_records_problem(folder):
    data = write_jsonl(folder / "d.jsonl", [variant(id="ok"), variant(id="long", image="长" * 300 + ".png")])
    rejects: list[Reject] = []
    recs = read_records(data, folder, skip_bad=True, rejects=rejects)
    assert [r.id for r in recs] == ["ok"]
    assert rejects[0].id == "long" and "cannot be looked up" in rejects[0].reason
    from qilin_lite.images.decode import load_image

    with pytest.raises(UserError, match="cannot look the image up"):
        load_image(folder / ("长" * 300 + ".png"))


def test_a_recipe_naming_deepspeed_without_it_is_one_line_and_none_off_null_unset_it(folder, tiny_base, tmp_path,
                                                                                      monkeypatch, capsys):
    import importlib.util

    from conftest import run_cli_captured

    from qilin_lite.config import REPO_RECIPES

    real = importlib.util.find_spec  # DeepSpeed is in the test extra: make this process see a machine without it
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "deepspeed" else real(n, *a))
    data = write_jsonl(folder / "d.jsonl", [variant(id=f"g{i}") for i in range(2)])
    recipe = REPO_RECIPES / "qilin-med-vl" / "align.yaml"
    code, out, err = run_cli_captured(monkeypatch, capsys, "align", recipe, "--data", data, "--image-folder", folder,
                                      "--model", tiny_base, "--out", tmp_path / "a")
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "DeepSpeed is not installed" in lines[0] and "train.deepspeed=none" in lines[0]
    assert not (tmp_path / "a" / ".qilin-data").exists()  # refused before any data work
    for word in ("none", "off", "null", "None"):
        assert load_recipe(recipe, [f"train.deepspeed={word}"]).train.deepspeed is None


def test_images_outside_the_folder_only_with_the_flag(folder, tmp_path_factory):
    """An image name that climbs out of --image-folder is never opened unless the data means it (absolute paths)."""
    from PIL import Image

    elsewhere = tmp_path_factory.mktemp("elsewhere")
    Image.new("RGB", (32, 32)).save(elsewhere / "y.png")
    data = write_jsonl(folder / "d.jsonl", [variant(id="abs", image=str(elsewhere / "y.png"))])
    with pytest.raises(UserError, match=r"d\.jsonl:1 \(abs\): image .* is outside the image folder"):
        read_records(data, folder)
    (rec,) = read_records(data, folder, allow_outside_images=True)
    assert rec.images == [elsewhere / "y.png"]
    # a symlink inside the folder is the user's own arrangement: allowed
    (folder / "link.png").symlink_to(elsewhere / "y.png")
    assert read_records(write_jsonl(folder / "l.jsonl", [variant(id="l", image="link.png")]), folder)


def test_data_check_reports_outside_images_without_opening_them(folder, monkeypatch):
    from qilin_lite.data.check import check_data

    opened = []
    import qilin_lite.images.decode as images_mod

    real = images_mod.load_image
    monkeypatch.setattr(images_mod, "load_image", lambda p, *a, **k: opened.append(p) or real(p, *a, **k))
    data = write_jsonl(folder / "d.jsonl", [GOOD, variant(id="up", image="../../etc/hostname")])
    result = check_data(data, folder)
    assert result.counts == {"image outside the folder": 1} and not result.ok
    assert all("hostname" not in str(p) for p in opened)
