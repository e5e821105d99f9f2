"""One reader and one turn parser: training, `data build` / `data stats` and `eval` read a file the same way."""

import json

import pytest
from PIL import Image

from qilin_lite.data.items import row_to_item
from qilin_lite.data.records import read_records
from qilin_lite.data.rows import iter_rows
from qilin_lite.data.sources import FieldMap, detect_layout
from qilin_lite.data.stats import data_stats
from qilin_lite.errors import UserError
from qilin_lite.eval import load_eval_items

ROWS = [
    {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\n左肺有什么？"},
                                                     {"from": "gpt", "value": "结节"}]},
    # role/content keys, as trl and LLaMA-Factory files write them
    {"id": "b", "image": "x.png", "messages": [{"role": "user", "content": "<image>\n心脏大小？"},
                                                {"role": "assistant", "content": "正常"}]},
]


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (8, 8), "white").save(tmp_path / "x.png")
    return tmp_path


def every_reader(path):
    """What training, data build, data stats and eval make of one file."""
    records = read_records(path, path.parent)
    rows = list(iter_rows(path))
    layout = detect_layout(rows[0][1], "auto", FieldMap(), "auto", None, path)
    items = [row_to_item(row, layout, line, path.name, None) for line, row, _ in rows]
    stats = data_stats(path, out=None)
    evals = load_eval_items(path, "llava", path.parent)
    return records, items, stats, evals


@pytest.mark.parametrize("layout", ["list", "jsonl", "list with a byte-order mark"])
def test_every_command_reads_the_same_rows_and_turns(folder, layout):
    path = folder / ("data.jsonl" if layout == "jsonl" else "data.json")
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) if layout == "jsonl" else \
        json.dumps(ROWS, ensure_ascii=False, indent=1)
    path.write_text(("\ufeff" if "mark" in layout else "") + text, encoding="utf-8")
    records, items, stats, evals = every_reader(path)
    assert [r.id for r in records] == [i.id for i in items] == [e.id for e in evals] == ["a", "b"]
    assert [[m["role"] for m in r.messages] for r in records] == [["user", "assistant"]] * 2
    assert [i.roles for i in items] == [["human", "gpt"]] * 2
    assert [(e.question, e.reference) for e in evals] == [("左肺有什么？", "结节"), ("心脏大小？", "正常")]
    assert stats["records"] == 2 and stats["bad_rows"] == 0
    assert {f["field"]: f["pairs"] for f in stats["fields"]} == {"question": 2, "answer": 2}


def broken_list(folder):
    path = folder / "data.json"
    good = json.dumps(ROWS[0], ensure_ascii=False)
    path.write_text(f"[\n{good},\n{good.replace('a', 'c', 1)},\n{{\"id\": \"d\", \"image\": \n]", encoding="utf-8")
    return path


def test_a_broken_list_stops_training_and_eval_at_its_line_and_is_reported_by_build(folder):
    path = broken_list(folder)
    for read in (lambda: read_records(path, folder, skip_bad=True), lambda: load_eval_items(path, "llava", folder)):
        # line 5: where the JSON parser finds the element broken (the `]` where a value should be)
        with pytest.raises(UserError, match=r"data\.json:5: not valid JSON \(Expecting value\); fix the file or conv"):
            read()
    rows = list(iter_rows(path))
    assert [r[0] for r in rows] == [1, 2, 3] and rows[2][1] is None
    assert "the records after it were not read" in rows[2][2]


def test_text_after_the_list_is_never_dropped_silently(folder):
    """A JSONL file whose first line happens to be a list: the lines after it are not lost without a word."""
    path = folder / "data.json"
    path.write_text(json.dumps(ROWS[:1], ensure_ascii=False) + "\n" + json.dumps(ROWS[1], ensure_ascii=False) + "\n",
                    encoding="utf-8")
    with pytest.raises(UserError, match=r"data\.json:2: not valid JSON \(more text after the list\)"):
        read_records(path, folder)
    rows = list(iter_rows(path))
    assert rows[-1][1] is None and "more text after the list" in rows[-1][2]


def test_eval_reads_roles_by_the_training_names(folder):
    """eval used to know only from=human/gpt (and user/assistant); it now reads turns as training does."""
    path = folder / "data.json"
    path.write_text(json.dumps([{"id": "s", "image": "x.png", "conversations": [
        {"from": "system", "value": "你是医生。"}, {"from": "USER", "value": "<image>\n何处异常？"},
        {"from": "Assistant", "value": "右下肺"}]}], ensure_ascii=False), encoding="utf-8")
    (item,) = load_eval_items(path, "llava", folder)
    assert (item.question, item.reference) == ("何处异常？", "右下肺")
    path.write_text(json.dumps([{"id": "u", "image": "x.png", "conversations": [
        {"from": "doctor", "value": "Q"}, {"from": "gpt", "value": "A"}]}]), encoding="utf-8")
    with pytest.raises(UserError, match=r"\(u\): turn 1 has unknown role 'doctor'"):
        load_eval_items(path, "llava", folder)


def test_json_nested_100000_deep_is_one_bad_row_not_a_recursion_error(tmp_path):
    """A JSONL line or a JSON list element nested 100,000 deep (RecursionError in `data check` before, issue 34)."""
    from qilin_lite.data.rows import iter_json

    deep = "[" * 100_000 + "]" * 100_000
    good = '{"id": "a", "conversations": []}'
    jsonl = tmp_path / "deep.jsonl"
    jsonl.write_text(good + "\n" + deep + "\n" + good + "\n", encoding="utf-8")
    rows = list(iter_json(jsonl))
    assert [r[1] is None for r in rows] == [False, True, False] and "nested deeper" in rows[1][2]
    listed = tmp_path / "deep.json"
    listed.write_text("[" + good + ", " + deep + "]", encoding="utf-8")
    rows = list(iter_json(listed))
    assert rows[0][1]["id"] == "a" and "nested deeper" in rows[-1][2]


def test_a_line_past_the_row_bound_is_refused_as_it_is_read(tmp_path, monkeypatch, folder):
    """A JSONL line longer than the bound (a 2 GB line was read whole and accepted before, issue 34) is one bad row
    naming its line and the bound, found without holding the line: here 8 MB over a bound lowered to 64 kB."""
    import tracemalloc

    from qilin_lite.data import rows as rows_mod
    from qilin_lite.data.rows import iter_json

    monkeypatch.setattr(rows_mod, "MAX_ROW_CHARS", 64 << 10)
    big = json.dumps({**ROWS[0], "id": "big", "note": "x" * (8 << 20)}, ensure_ascii=False)
    jsonl = folder / "big.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [ROWS[0], None, ROWS[1]])
                     .replace("null", big) + "\n", encoding="utf-8")
    tracemalloc.start()
    rows = list(iter_json(jsonl))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(line, row is None) for line, row, _ in rows] == [(1, False), (2, True), (3, False)]
    assert "longer than 65,536 characters" in rows[1][2]
    assert peak < 3 << 20  # the 8 MB line was never held whole (read whole, the line alone is 8 MB)
    with pytest.raises(UserError, match=r"big\.jsonl:2: .*longer than 65,536 characters"):
        read_records(jsonl, folder)
    # a JSON list's element past the bound ends the list at that element, also without reading it all
    listed = folder / "big.json"
    listed.write_text("[" + json.dumps(ROWS[0]) + ", " + big + "]", encoding="utf-8")
    rows = list(iter_json(listed))
    assert rows[0][1]["id"] == "a" and rows[-1][1] is None and "within 65,536 characters" in rows[-1][2]
