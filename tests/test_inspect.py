"""`qilin-lite data inspect`: what training builds from each record, supervised tokens marked, and the JSON form."""

from __future__ import annotations

import json

from conftest import run_cli_captured

from qilin_lite.families import get_template
from qilin_lite.data.records import read_records
from qilin_lite.encoding import encode


def test_json_is_exactly_what_training_encodes(tiny_base, tiny_data, tok_layout, monkeypatch, capsys):
    tok, layout = tok_layout
    code, out, err = run_cli_captured(monkeypatch, capsys, "data", "inspect", tiny_data["tune"], "--model", tiny_base,
                                      "--image-folder", tiny_data["images"], "-n", "3", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    recs = read_records(tiny_data["tune"], tiny_data["images"])[:3]
    assert [r["id"] for r in rows] == [r.id for r in recs]
    for row, rec in zip(rows, recs):
        ids, labels = encode(rec.messages, get_template("vicuna_v1"), tok,
                             type(layout)(layout.image_token_id, layout.num_image_tokens, 2048))
        assert row["input_ids"] == ids.tolist() and row["labels"] == labels.tolist()
        assert row["input_ids"].count(layout.image_token_id) == layout.num_image_tokens


def test_text_view_marks_supervised_tokens_and_the_cut(tiny_base, tiny_data, tok_layout, monkeypatch, capsys):
    _, layout = tok_layout
    args = ["data", "inspect", tiny_data["tune"], "--model", tiny_base, "--image-folder", tiny_data["images"], "-n", "1"]
    full = json.loads(run_cli_captured(monkeypatch, capsys, *args, "--json")[1])
    text_ids = len(full["input_ids"]) - layout.num_image_tokens + 1  # the authors' count: the image is one id
    code, out, err = run_cli_captured(monkeypatch, capsys, *args, "--max-length", str(text_ids - 1), "--no-color")
    assert code == 0, err
    head, body = out.splitlines()[:2]
    assert f"supervised; cut: cut at {text_ids - 1} text ids (images count one each) from {text_ids}" in head
    assert "<image ×" in body and "[</s>]" not in body.split("ASSISTANT")[0]
    supervised = int(head.split(" supervised")[0].rsplit(" ", 1)[1])
    assert body.count("[") == supervised > 0
    assert "\033[" not in out


def test_a_record_the_template_cannot_express_is_one_line(tiny_base, tiny_data, tmp_path, monkeypatch, capsys):
    rows = json.loads(open(tiny_data["align"], encoding="utf-8").read())[:1]
    rows[0]["conversations"] += [{"from": "human", "value": "再说一遍"}, {"from": "gpt", "value": "好的"}]
    f = tmp_path / "two-captions.json"
    f.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    code, out, err = run_cli_captured(monkeypatch, capsys, "data", "inspect", f, "--model", tiny_base,
                                      "--image-folder", tiny_data["images"], "--template", "plain")
    assert code == 0
    assert "cannot be trained on: the plain (align) template takes one caption per record, this one has 2" in out
    assert "Traceback" not in out + err
