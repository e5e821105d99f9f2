"""`data check`: every planted problem is found with its line number, by the same rules training applies
(records.read_records, processing.sample_lengths, images.load_image); exit 1 on any failure, 0 on a clean file."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli_captured as run_cli
from PIL import Image

from qilin_lite.data.build import BuildConfig, build
from qilin_lite.data.check import check_data


def turn(who, value):
    return {"from": who, "value": value}


def good(rid, image="ok.png", answer="右侧。"):
    return {"id": rid, "image": image, "conversations": [turn("human", "<image>\n病灶在哪一侧？"), turn("gpt", answer)]}


@pytest.fixture
def planted(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), (90, 90, 90)).save(folder / "ok.png")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(folder / "cut.png")
    data = (folder / "cut.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])  # truncated: exists, does not decode
    lines = [
        json.dumps(good("fine-1")),  # 1
        '{"id": "broken", "image": "ok.png", ',  # 2 bad JSON
        json.dumps({"id": "order", "image": "ok.png",  # 3 roles out of order
                    "conversations": [turn("gpt", "先回答"), turn("human", "<image>\n后提问")]}),
        json.dumps({"id": "tags", "image": "ok.png",  # 4 two <image> tags, one image
                    "conversations": [turn("human", "<image>\n<image>\n比较两图"), turn("gpt", "相同。")]}),
        json.dumps(good("gone", image="nowhere.png")),  # 5 missing image
        json.dumps(good("corrupt", image="cut.png")),  # 6 does not decode
        json.dumps(good("empty", answer="  ")),  # 7 empty reply
        json.dumps(good("long", answer="病灶" * 200)),  # 8 too long for max_length 64
        json.dumps(good("fine-2")),  # 9
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, folder


EXPECTED = {  # problem -> (line, id) planted
    "bad JSON": "train.jsonl:2",
    "roles out of order": "train.jsonl:3 (order)",
    "image count mismatch": "train.jsonl:4 (tags)",
    "missing image": "train.jsonl:5 (gone)",
    "image does not decode": "train.jsonl:6 (corrupt)",
    "empty text": "train.jsonl:7 (empty)",
    "too long": "train.jsonl:8 (long)",
}


def test_every_planted_problem_with_its_line(planted, tiny_base):
    path, folder = planted
    result = check_data(path, folder, model=tiny_base, max_length=64, template="vicuna_v1")
    assert result.records == 9 and result.failed == 7 and not result.ok
    assert result.counts == {kind: 1 for kind in EXPECTED}
    for kind, at in EXPECTED.items():
        [example] = result.examples[kind]
        assert example.startswith(str(path.parent / at) + ": "), example
    assert "> max_length 64" in result.examples["too long"][0]
    assert "text ids (images count one) > max_length 64" in result.examples["too long"][0]  # the authors' cut
    total = check_data(path, folder, model=tiny_base, max_length=64, template="vicuna_v1", length_mode="total")
    assert "16 of them image tokens" in total.examples["too long"][0]  # 32 px / patch 8 = 16 tokens per image
    text = result.format()
    assert "9 records, 2 ok, 7 with problems" in text and "records/s" in text


def test_without_model_lengths_are_not_checked(planted):
    path, folder = planted
    result = check_data(path, folder, examples=0)
    assert "too long" not in result.counts and result.failed == 6
    assert result.examples["bad JSON"] == [] and "lengths not checked" in result.format()


def test_examples_are_capped(tmp_path):
    folder = tmp_path
    Image.new("RGB", (8, 8)).save(folder / "ok.png")
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(good(f"g{i}", image=f"missing{i}.png")) + "\n" for i in range(12)) +
                    json.dumps(good("ok")) + "\n", encoding="utf-8")
    result = check_data(path, folder, examples=3)
    assert result.counts == {"missing image": 12} and len(result.examples["missing image"]) == 3
    assert result.examples["missing image"][0].startswith(f"{path}:1 (g0): ")


def test_cli_exit_codes(planted, tmp_path, monkeypatch, capsys, tiny_base):
    path, folder = planted
    code, out, _ = run_cli(monkeypatch, capsys, "data", "check", path, "--image-folder", folder, "--model", tiny_base,
                           "--max-length", "64", "--examples", "1")
    assert code == 1 and "too long: 1" in out and "train.jsonl:8 (long)" in out
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps(good("a")) + "\n" + json.dumps(good("b")) + "\n", encoding="utf-8")
    code, out, _ = run_cli(monkeypatch, capsys, "data", "check", clean, "--image-folder", folder, "--model", tiny_base)
    assert code == 0 and "2 records, 2 ok, 0 with problems" in out
    code, _, err = run_cli(monkeypatch, capsys, "data", "check", tmp_path / "nope.jsonl")
    assert code == 2 and "not found" in err and err.count("\n") == 1


def test_built_data_passes_check(tmp_path):
    images = tmp_path / "figs"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (30 + 10 * i, 30), (60 * i, 0, 0)).save(images / f"f{i}.png")
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"image": img, "caption": "胸部CT示右肺结节，边界清楚。"}, ensure_ascii=False) + "\n"
                           for img in ("f0.png", "f1.png", "f0.png,f1.png,f2.png")), encoding="utf-8")
    out = tmp_path / "built" / "align.jsonl"
    build([src], out, [images], BuildConfig(workers=0))
    result = check_data(out)  # image paths are relative to the output's folder: no --image-folder needed
    assert result.records == 3 and result.ok, result.format()


def test_control_characters_in_names_print_escaped(planted, tmp_path, monkeypatch, capsys, tiny_base):
    """A newline or NUL in a file name, an image name or an id is printed escaped (`\\n`, `\\x00`), so one problem
    stays one line and no name can forge a report line (printed raw before, issue 34)."""
    _, folder = planted
    odd = tmp_path / "da\nta.jsonl"
    rows = [good("a\n[ok] 0 problems", image="x\n.png"), good("b", image="y\x00.png"), good("c\x1b[2J")]
    odd.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    code, out, _ = run_cli(monkeypatch, capsys, "data", "check", odd, "--image-folder", folder)
    assert code == 1 and "\x00" not in out and "\x1b" not in out
    problems = [line for line in out.splitlines() if line.startswith("  ")]
    fix = " not found; check --image-folder or the record's 'image' field"
    assert problems == [f"  {tmp_path}/da\\nta.jsonl:1 (a\\n[ok] 0 problems): image '{folder}/x\\n.png'" + fix,
                        f"  {tmp_path}/da\\nta.jsonl:2 (b): image '{folder}/y\\x00.png'" + fix]
    code, _, err = run_cli(monkeypatch, capsys, "data", "check", tmp_path / "no\nfile.jsonl")
    assert code == 2 and err.startswith(f"error: {tmp_path}/no\\nfile.jsonl: data file not found") and err.count("\n") == 1
    # inspect prints the same names the same way
    code, out, _ = run_cli(monkeypatch, capsys, "data", "inspect", odd, "--model", tiny_base,
                           "--image-folder", folder, "-n", "3")
    assert "\x1b[2J" not in out and r"(c\x1b[2J)" in out
