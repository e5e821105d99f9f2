"""`data stats`: pairs, totals, max and median (Q1, Q3) per field and source against hand-computed values (numpy's
default linear quantiles: Q1 of [1, 2, 3, 10] is 1 + 0.75 * (2 - 1) = 1.75), image sizes from headers, the PNG."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from qilin_lite.data.stats import data_stats, format_stats


def rec(rid, source, task, question, answer, image=None):
    r = {"id": rid, "conversations": [{"from": "human", "value": "<image>\n" + question},
                                      {"from": "gpt", "value": answer}], "task": task}
    if source:
        r["source"] = source
    if image:
        r["image"] = image
    return r


@pytest.fixture
def sample(tmp_path):
    rows = [
        # source A, captions of 1, 2, 3 and 10 characters
        rec("a1", "A", "caption", "请描述这张图像。", "肺", "x.png"),
        rec("a2", "A", "caption", "请描述这张图像。", "肺部", "y.png"),
        rec("a3", "A", "caption", "请描述这张图像。", "右肺野", "z.png"),
        rec("a4", "A", "caption", "请描述这张图像。", "右肺上叶见结节影边界", "x.png"),
        # source B, questions of 4, 6, 9 characters and answers of 2, 2, 5
        rec("b1", "B", "vqa", "病灶在哪", "右侧", "y.png"),
        rec("b2", "B", "vqa", "这是什么检查", "CT", "gone.png"),
        rec("b3", "B", "vqa", "这是哪个部位的图像", "胸部正位片", "bad.png"),
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    # no `source` and no `task`: the file name is the source, an image-only question makes it a caption
    lines.append(json.dumps({"id": "c1", "conversations": [{"from": "human", "value": "<image>"},
                                                          {"from": "gpt", "value": "心影增大"}]}, ensure_ascii=False))
    lines.append("{not json")
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    folder = tmp_path / "img"
    folder.mkdir()
    for name, size in (("x.png", (40, 30)), ("y.png", (20, 10)), ("z.png", (60, 50))):
        Image.new("RGB", size).save(folder / name)
    (folder / "bad.png").write_bytes(b"not an image")
    return path, folder


def row(result, source, field):
    [r] = [r for r in result["fields"] if r["source"] == source and r["field"] == field]
    return r


def test_character_statistics_by_hand(sample, tmp_path):
    path, folder = sample
    result = data_stats(path, image_folder=folder, out=tmp_path / "s.png")
    assert result["unit"] == "characters" and result["records"] == 8 and result["bad_rows"] == 1
    a = row(result, "A", "caption")
    assert (a["pairs"], a["total"], a["max"], a["median"], a["q1"], a["q3"]) == (4, 16, 10, 2.5, 1.75, 4.75)
    q, ans = row(result, "B", "question"), row(result, "B", "answer")
    # questions keep the prompt wording training sees, minus "<image>": here the question itself
    assert (q["pairs"], q["total"], q["max"], q["median"], q["q1"], q["q3"]) == (3, 19, 9, 6.0, 5.0, 7.5)
    assert (ans["total"], ans["median"], ans["q1"], ans["q3"]) == (9, 2.0, 2.0, 3.5)
    c = row(result, "mixed.jsonl", "caption")
    assert (c["pairs"], c["total"]) == (1, 4)
    everything = row(result, "all", "caption")  # A's four plus the file-named one: 1, 2, 3, 4, 10
    assert (everything["pairs"], everything["median"], everything["q1"], everything["q3"]) == (5, 3.0, 2.0, 4.0)

    im = result["images"]
    assert (im["referenced"], im["found"], im["missing"], im["unreadable"]) == (5, 3, 1, 1)
    assert (im["width"]["median"], im["width"]["q1"], im["width"]["q3"]) == (40.0, 30.0, 50.0)
    assert (im["height"]["min"], im["height"]["max"]) == (10, 50)

    with Image.open(tmp_path / "s.png") as png:
        assert png.format == "PNG" and png.width > 400
    assert json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))["fields"] == result["fields"]
    text = format_stats(result)
    assert "2.5 (1.75, 4.75)" in text and "images: 5 referenced, 3 found, 1 missing, 1 unreadable" in text


def test_token_statistics_use_the_models_tokenizer(sample, tmp_path, tiny_base):
    from qilin_lite.model import load_tokenizer_and_processor

    path, _ = sample
    result = data_stats(path, model=tiny_base, out=None)
    tok, _ = load_tokenizer_and_processor(str(tiny_base))
    answers = ["右侧", "CT", "胸部正位片"]
    counts = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers]
    ans = row(result, "B", "answer")
    assert result["unit"] == "tokens" and "images" not in result and "png" not in result
    assert (ans["total"], ans["max"]) == (sum(counts), max(counts))


def test_cli_exit_codes(sample, tmp_path, monkeypatch, capsys):
    from qilin_lite import cli

    path, folder = sample

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["qilin-lite", "data", "stats", *map(str, args)])
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0
        return code, capsys.readouterr()

    code, out = run(path, "--image-folder", folder, "--out", tmp_path / "cli.png")
    assert code == 0 and "median (Q1, Q3)" in out.out and (tmp_path / "cli.png").is_file()
    code, out = run(tmp_path / "missing.jsonl", "--out", tmp_path / "x.png")
    assert code == 2 and "not found" in out.err and out.err.count("\n") == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("{oops\n", encoding="utf-8")
    code, out = run(empty, "--out", tmp_path / "y.png")
    assert code == 2 and "no records with text" in out.err
