"""Damaged files a model directory may hold (issue 34): a truncated or foreign safetensors file (adapter, projector,
base model) and a broken `qilin.json` each end in one line naming the file, never a traceback from safetensors,
peft or json."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from conftest import run_cli_captured

from qilin_lite.errors import UserError


def _copy_run(run: Path, dst: Path) -> Path:
    """A copy of a run whose base is written absolute, so the copy still finds it."""
    from qilin_lite.model import RunInfo, resolve_base

    shutil.copytree(run, dst)
    info = json.loads((dst / "qilin.json").read_text(encoding="utf-8"))
    if info.get("base"):
        info["base"] = resolve_base(Path(run), RunInfo.load(run))
        (dst / "qilin.json").write_text(json.dumps(info), encoding="utf-8")
    return dst


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a copy that stopped half-way


def _bad_header(f: Path) -> None:
    f.write_bytes(struct.pack("<Q", 10**12) + b"{}")  # a header length no file has: not safetensors


@pytest.mark.parametrize("damage", [_truncate, _bad_header], ids=["truncated", "bad header"])
def test_a_damaged_adapter_is_one_line_in_chat_loading_and_merge(lora_run, tmp_path, damage):
    from qilin_lite.merge import merge_run
    from qilin_lite.model import load_run

    run = _copy_run(lora_run, tmp_path / "run")
    damage(run / "adapter_model.safetensors")
    want = r"adapter_model\.safetensors: cannot read these .*weights .*truncated or not safetensors"
    with pytest.raises(UserError, match=want):
        load_run(run, dtype="float32")
    with pytest.raises(UserError, match=r"adapter_model\.safetensors: cannot read"):
        merge_run(run, tmp_path / "merged")
    assert not (tmp_path / "merged" / "model.safetensors").exists()


def test_a_damaged_projector_and_base_are_one_line(align_run, tiny_base, tmp_path, monkeypatch, capsys):
    from qilin_lite.model import load_vlm, load_run

    run = _copy_run(align_run, tmp_path / "align")
    _truncate(run / "projector.safetensors")
    with pytest.raises(UserError, match=r"projector\.safetensors: cannot read these projector weights"):
        load_run(run, dtype="float32")
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    for f in base.glob("*.safetensors"):
        _bad_header(f)
    with pytest.raises(UserError, match=r"model\.safetensors: cannot read these weights \(.*header too large\)"):
        load_vlm(str(base), dtype="float32")
    # and through a command: one line on stderr, exit 2
    capsys.readouterr()  # the loads above printed their progress
    code, out, err = run_cli_captured(monkeypatch, capsys, "merge", run, tmp_path / "merged")
    assert code == 2 and "projector.safetensors: cannot read" in err and err.count("\n") == 1


def test_convert_reads_a_damaged_shard_as_one_line(tmp_path):
    from qilin_lite.convert import iter_tensors, tensor_shapes

    f = tmp_path / "model-00001-of-00002.safetensors"
    f.write_bytes(b"<html>502 Bad Gateway</html>")
    with pytest.raises(UserError, match=r"model-00001-of-00002\.safetensors: cannot read these weights"):
        tensor_shapes(f)
    with pytest.raises(UserError, match=r"model-00001-of-00002\.safetensors: cannot read"):
        list(iter_tensors(f))


@pytest.mark.parametrize("text, problem", [
    ('{"kind": "lora", "template": ', r"qilin\.json:1: not valid JSON"),
    ('["lora"]', r"qilin\.json: holds a JSON list, not an object"),
    ('{"kind": "lora", "image_mode": "pad"}', r"qilin\.json: 'template' is missing"),
    ('{"kind": 7, "template": "vicuna_v1", "image_mode": "pad"}', r"qilin\.json: 'kind' is 7, not a name"),
    ('{"kind": "lorra", "template": "vicuna_v1", "image_mode": "pad"}', r"qilin\.json: kind \"lorra\" is none"),
    ('{"kind": "lora", "template": "vicuna_v1", "image_mode": "pad", "base": ["a"]}',
     r"qilin\.json: 'base' is \[\"a\"\], which is not a str or null"),
], ids=["invalid JSON", "a list", "missing key", "wrong type", "unknown kind", "base not a string"])
def test_a_broken_qilin_json_is_one_line(lora_run, tmp_path, monkeypatch, capsys, text, problem):
    from qilin_lite.model import load_run

    run = _copy_run(lora_run, tmp_path / "run")
    (run / "qilin.json").write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=problem + r".*; restore it"):
        load_run(run, dtype="float32")
    capsys.readouterr()
    code, _, err = run_cli_captured(monkeypatch, capsys, "merge", run, tmp_path / "out")
    assert code == 2 and "qilin.json" in err and err.count("\n") == 1 and not (tmp_path / "out").exists()
