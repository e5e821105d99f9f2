"""`data build`: raw PMC-style sources -> LLaVA files; every drop listed with its step; composites; seeded prompts;
translation through a local OpenAI-compatible stub that fails first, and a resume that pays nothing twice."""

from __future__ import annotations

import csv
import json
import threading
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import reply_chat_completion
from conftest import run_cli_captured as run_cli
from PIL import Image

from qilin_lite.data.build import BuildConfig, build
from qilin_lite.data.items import PROMPTS
from qilin_lite.data.records import read_records
from qilin_lite.data.rows import iter_rows
from qilin_lite.data.sources import FieldMap
from qilin_lite.data.translate import TranslateConfig
from qilin_lite.errors import UserError

CONTEXT = "患者女性，73岁，因左侧肢体无力入院，头颅CT显示右侧基底节区低密度影。"  # 35 characters


def write_jsonl(path: Path, rows) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def make_images(folder: Path, names, size=(40, 30)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        Image.new("RGB", size, (40 * i % 256, 100, 150)).save(folder / n)


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def casereport(tmp_path):
    """PMC-CaseReport-shaped rows (img_ref as a Python list literal) with 1-, 3- and 5-image items, a missing image,
    a short context, a duplicate and a bad line."""
    images = tmp_path / "figures"
    make_images(images, [f"PMC1_F{i}.jpg" for i in range(1, 6)] + ["PMC2_F1.jpg"])
    base = {"question": "图中显示了什么？", "answer": "右侧基底节区低密度影。", "inline": "头颅CT。"}
    rows = [
        dict(base, id="c1", PMC_id="PMC2", img_ref="['PMC2_F1.jpg']", context=CONTEXT),
        dict(base, id="c3", PMC_id="PMC1", img_ref="['PMC1_F1.jpg', 'PMC1_F2.jpg', 'PMC1_F3.jpg']", context=CONTEXT),
        dict(base, id="c5", PMC_id="PMC1", img_ref=str([f"PMC1_F{i}.jpg" for i in range(1, 6)]), context=CONTEXT),
        dict(base, id="miss", PMC_id="PMC3", img_ref="['PMC3_F1.jpg', 'PMC2_F1.jpg', 'PMC3_F9.jpg']", context=CONTEXT),
        dict(base, id="short", PMC_id="PMC2", img_ref="['PMC2_F1.jpg']", context="见图。"),
        '{"id": "broken", ',
        dict(base, id="c1", PMC_id="PMC2", img_ref="['PMC2_F1.jpg']", context=CONTEXT + "重复"),
    ]
    return write_jsonl(tmp_path / "casereport.jsonl", rows), images


def test_caption_source_every_step_counted(casereport, tmp_path):
    src, images = casereport
    out = tmp_path / "out" / "align.jsonl"
    report = build([src], out, [images], BuildConfig(task="align", workers=0))

    recs = read_out(out)
    assert [r["id"] for r in recs] == ["c1", "c3"]
    assert all(r["task"] == "context" and r["source"] == "PMC-CaseReport" for r in recs)
    human, gpt = recs[0]["conversations"]
    assert human["from"] == "human" and human["value"].startswith("<image>\n")
    assert human["value"].removeprefix("<image>\n") in PROMPTS["context"] and gpt == {"from": "gpt", "value": CONTEXT}
    # image paths are relative to the output's folder: training needs no --image-folder
    assert recs[0]["image"] == "../figures/PMC2_F1.jpg"
    assert recs[1]["image"].startswith("align_images/") and recs[1]["image"].endswith(".png")
    assert len(read_records(out)) == 2

    dropped = {s["step"]: s["dropped"] for s in report["steps"]}
    assert dropped == {"read": 1, "fields": 0, "duplicate": 1, "too_many_images": 1, "missing_image": 1,
                       "too_short": 1, "composite": 0, "validate": 0}
    assert [s["kept"] for s in report["steps"]][-1] == report["written"] == 2 and report["rows"] == 7
    assert report["missing_image_files"] == 2 and report["composites"] == 1
    assert report["inputs"][0]["layout"] == "pmc-casereport"
    assert json.loads(out.with_suffix(".report.json").read_text()) == report

    rejects = {r["id"] or r["line"]: r for r in read_out(out.with_suffix(".rejects.jsonl"))}
    assert rejects[6]["step"] == "read" and "not valid JSON" in rejects[6]["reason"]
    assert rejects["c5"]["step"] == "too_many_images" and rejects["c5"]["line"] == 3
    assert rejects["miss"]["step"] == "missing_image" and rejects["miss"]["line"] == 4
    assert "PMC3_F1.jpg" in rejects["miss"]["reason"] and "PMC3_F9.jpg" in rejects["miss"]["reason"]
    assert "PMC2_F1.jpg" not in rejects["miss"]["reason"]
    assert rejects["short"]["step"] == "too_short" and rejects["c1"]["step"] == "duplicate"
    assert rejects["c1"]["line"] == 7
    # reports name files, lines, ids and images, never the record's text
    text = out.with_suffix(".rejects.jsonl").read_text(encoding="utf-8") + out.with_suffix(".report.json").read_text()
    assert "基底节" not in text and "见图" not in text


def test_composite_geometry(casereport, tmp_path):
    src, images = casereport
    out = tmp_path / "align.json"  # .json: a JSON list
    build([src], out, [images], BuildConfig(task="align", workers=0))
    recs = json.loads(out.read_text(encoding="utf-8"))
    files = sorted((tmp_path / "align_images").iterdir())
    assert [f.name for f in files] == [Path(recs[1]["image"]).name]
    with Image.open(files[0]) as im:
        # three 40x30 images: side by side 120x30 (4:1) or stacked 40x90 (1:2.25): the squarer wins
        assert im.format == "PNG" and im.size == (40, 90)


def test_separate_images_keep_each_file_with_its_own_tag(casereport, tmp_path):
    """--images separate: no composite is made; a multi-image item lists its files in order, one `<image>` each, and
    up to --max-images (past 4, which only a composite needs) images stay in."""
    src, images = casereport
    out = tmp_path / "sep.jsonl"
    report = build([src], out, [images], BuildConfig(task="align", workers=0, images="separate", max_images=5))
    recs = {r["id"]: r for r in read_out(out)}
    assert sorted(recs) == ["c1", "c3", "c5"] and report["images"] == "separate" and report["composites"] == 0
    assert not (tmp_path / "sep_images").exists()
    assert recs["c1"]["image"] == "figures/PMC2_F1.jpg"  # one image stays a file name, as in the paper's records
    assert recs["c3"]["image"] == [f"figures/PMC1_F{i}.jpg" for i in (1, 2, 3)]
    assert len(recs["c5"]["image"]) == 5
    human = recs["c3"]["conversations"][0]["value"]
    assert human.startswith("<image>\n" * 3) and human.count("<image>") == 3
    assert human.removeprefix("<image>\n" * 3) in PROMPTS["context"]
    assert [len(r.images) for r in read_records(out)] == [1, 3, 5]
    # the same input, composited: the prompt draw does not depend on the image layout
    build([src], tmp_path / "comp.jsonl", [images], BuildConfig(task="align", workers=0))
    comp = {r["id"]: r for r in read_out(tmp_path / "comp.jsonl")}
    assert comp["c3"]["conversations"][0]["value"] == "<image>\n" + human.removeprefix("<image>\n" * 3)
    with pytest.raises(UserError, match="--images must be composite or separate"):
        BuildConfig(images="tiles")
    with pytest.raises(UserError, match="--max-images must be 1 to 4"):
        BuildConfig(max_images=5)


def test_instruct_task_and_choice_prompt_from_pmc_vqa_csv(tmp_path):
    images = tmp_path / "images"
    make_images(images, ["PMC10_F1.jpg", "PMC11_F2.jpg"])
    path = tmp_path / "train.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Figure_path", "Question", "Answer", *(f"Choice {c}" for c in "ABCD"), "Answer_label"])
        w.writerow(["PMC10_F1.jpg", "该图像的成像方式是什么？", "A:CT", "A:CT", "B:MRI", "C:超声", "D:X光", "A"])
        w.writerow(["PMC11_F2.jpg", "病灶位于哪一侧？", "", "A:左侧", "B:右侧", "", "", ""])  # no answer
        w.writerow(["PMC11_F2.jpg", "哪？", "右侧", "", "", "", "", ""])  # question too short
    out = tmp_path / "tune.jsonl"
    report = build([path], out, [images], BuildConfig(workers=0))
    [rec] = read_out(out)
    assert rec["task"] == "vqa" and rec["source"] == "PMC-VQA" and rec["id"].startswith("PMC10_F1-")
    q = rec["conversations"][0]["value"]
    assert q.startswith("<image>\n") and "该图像的成像方式是什么？\nA. CT\nB. MRI\nC. 超声\nD. X光" in q
    assert rec["conversations"][1] == {"from": "gpt", "value": "CT"}
    assert report["inputs"][0]["task"] == "vqa"
    reasons = sorted(r["reason"] for r in read_out(out.with_suffix(".rejects.jsonl")))
    assert reasons == ["empty answer", "question has 2 characters, fewer than --min-question-chars 4"]


def test_casereport_parquet_as_published_on_the_hub(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    images = tmp_path / "figures"
    make_images(images, ["PMC7_F1.jpg", "PMC7_F2.jpg"])
    row = {"PMC_id": "PMC7", "context": CONTEXT, "inline": "头颅CT平扫示右侧低密度影。", "question": "图中显示了什么？",
           "answer": "低密度影。", "img_ref": "['PMC7_F1.jpg', 'PMC7_F2.jpg']"}
    pq.write_table(pa.Table.from_pylist([row, dict(row, img_ref="['PMC7_F2.jpg']")]), tmp_path / "train.parquet")
    out = tmp_path / "inline.jsonl"
    build([tmp_path / "train.parquet"], out, [images], BuildConfig(task="align", fields=FieldMap(text="inline"),
                                                                    workers=0))
    recs = read_out(out)
    assert [r["task"] for r in recs] == ["caption", "caption"] and recs[0]["id"].startswith("PMC7-")
    assert recs[0]["image"].startswith("inline_images/") and recs[1]["image"] == "figures/PMC7_F2.jpg"
    assert recs[0]["conversations"][1]["value"] == "头颅CT平扫示右侧低密度影。"


def test_llava_layout_json_list_is_streamed_and_multi_image_collapsed(tmp_path):
    images = tmp_path / "img"
    make_images(images, ["a.png", "b.png"])
    rows = [
        {"id": "1", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\n两张图有何不同？"}, {"from": "gpt", "value": "第二张图可见积液。"},
            {"from": "human", "value": "积液在哪一侧？"}, {"from": "gpt", "value": "右侧。"}]},
        {"id": "2", "image": "a.png", "conversations": [
            {"from": "gpt", "value": "先回答"}, {"from": "human", "value": "<image>\n后提问"}]},  # roles out of order
        {"id": "3", "image": "a.png", "source": "ChiMed-VL", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "胸部X光片，右下肺野见片状阴影。"}]},
    ]
    src = tmp_path / "ChiMed-VL-Instruction.json"
    src.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    assert [line for line, _, _ in iter_rows(src)] == [1, 2, 3]
    out = tmp_path / "out.jsonl"
    build([src], out, [images], BuildConfig(workers=0))
    recs = read_out(out)
    assert [r["id"] for r in recs] == ["1", "3"]
    assert recs[0]["conversations"][0]["value"] == "<image>\n两张图有何不同？"
    assert recs[0]["conversations"][2]["value"] == "积液在哪一侧？" and recs[0]["image"].endswith(".png")
    assert recs[1]["conversations"][0]["value"] == "<image>" and recs[1]["source"] == "ChiMed-VL"
    assert recs[0]["source"] == "ChiMed-VL-Instruction"
    [rej] = read_out(out.with_suffix(".rejects.jsonl"))
    assert rej["id"] == "2" and rej["step"] == "validate" and "roles must alternate" in rej["reason"]


def test_field_options_map_an_unknown_layout(tmp_path):
    images = tmp_path / "img"
    make_images(images, ["x1.png"])
    src = write_jsonl(tmp_path / "mine.jsonl", [
        {"uid": "u1", "pic": "x1.png", "ask": "这是什么部位？", "reply": "胸部。", "opts": ["胸部", "腹部"]},
    ])
    out = tmp_path / "o.jsonl"
    with pytest.raises(UserError, match="--image-field"):
        build([src], out, [images], BuildConfig(workers=0))
    fields = FieldMap(id="uid", image="pic", question="ask", answer="reply", choices=["opts"])
    build([src], out, [images], BuildConfig(fields=fields, workers=0))
    [rec] = read_out(out)
    assert rec["id"] == "u1" and "这是什么部位？\nA. 胸部\nB. 腹部" in rec["conversations"][0]["value"]
    with pytest.raises(UserError, match="--image-field 'picture' is not a field"):
        build([src], out, [images], BuildConfig(fields=FieldMap(image="picture"), workers=0))


def test_ambiguous_casereport_asks_for_task(casereport, tmp_path):
    src, images = casereport
    with pytest.raises(UserError, match="--task align .* --task instruct"):
        build([src], tmp_path / "x.jsonl", [images], BuildConfig(workers=0))
    build([src], tmp_path / "qa.jsonl", [images], BuildConfig(task="instruct", workers=0))
    recs = read_out(tmp_path / "qa.jsonl")
    assert recs[0]["task"] == "vqa" and recs[0]["conversations"][1]["value"] == "右侧基底节区低密度影。"


def test_same_seed_same_bytes_other_seed_other_prompts(casereport, tmp_path):
    src, images = casereport
    files = {}
    for name, workers in (("a", 2), ("b", 0)):  # composites in worker processes or in this one
        out = tmp_path / name / "align.jsonl"
        build([src], out, [images], BuildConfig(task="align", seed=7, workers=workers))
        files[name] = {p.relative_to(out.parent): p.read_bytes() for p in sorted(out.parent.rglob("*")) if p.is_file()}
    assert files["a"] == files["b"]
    assert len(files["a"]) == 4  # output, rejects, report, one composite
    # 30 rows, so a different seed almost surely draws a different prompt for some
    many = write_jsonl(tmp_path / "many.jsonl", [
        {"id": f"m{i}", "image": "PMC2_F1.jpg", "caption": f"第{i}号图像：胸部CT平扫示右肺结节。"} for i in range(30)])
    prompts = []
    for seed in (7, 8):
        out = tmp_path / f"many{seed}.jsonl"
        build([many], out, [images], BuildConfig(seed=seed, workers=0))
        prompts.append([r["conversations"][0]["value"] for r in read_out(out)])
    assert prompts[0] != prompts[1] and len(set(prompts[0])) > 5


# ---------------------------------------------------------------- translation through a local stub


class Stub:
    """An OpenAI-compatible chat-completions server on 127.0.0.1: the first `fail_first` calls get `status`, and after
    `fail_after` translated texts every call fails; translations are '译文:' + text."""

    def __init__(self, fail_first=0, status=500, fail_after=None):
        self.fail_first, self.status, self.fail_after = fail_first, status, fail_after
        self.calls, self.texts, self.lock = 0, [], threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][-1]["content"]
                try:
                    batch = json.loads(content)
                except json.JSONDecodeError:
                    batch = None
                texts = batch if isinstance(batch, list) else [content]
                with stub.lock:
                    stub.calls += 1
                    fail = stub.calls <= stub.fail_first or (
                        stub.fail_after is not None and len(stub.texts) + len(texts) > stub.fail_after)
                    if not fail:
                        stub.texts += texts
                if fail:
                    self.send_response(stub.status)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                out = ["译文:" + t for t in texts]
                reply = json.dumps(out, ensure_ascii=False) if isinstance(batch, list) else out[0]
                reply_chat_completion(self, reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)  # quick shutdown

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def english_oa(tmp_path: Path, n: int) -> tuple[Path, Path]:
    images = tmp_path / "oa"
    make_images(images, ["PMC5_F1.jpg"])
    rows = [{"image": "PMC5_F1.jpg", "caption": f"Axial CT image number {i} shows a mass in the right lung."}
            for i in range(n)]
    rows.append({"image": "PMC5_F1.jpg", "caption": "胸部CT示右肺上叶结节，边界清楚。"})  # Chinese: not sent
    return write_jsonl(tmp_path / "pairs.jsonl", rows), images


@pytest.mark.parametrize("status", [500, 429])
def test_translation_retries_then_keeps_source_text(tmp_path, monkeypatch, status):
    monkeypatch.setenv("TEST_KEY", "sk-test")
    src, images = english_oa(tmp_path, 3)
    out = tmp_path / "zh.jsonl"
    with Stub(fail_first=1, status=status) as stub:
        tr = TranslateConfig(stub.url, "gpt-3.5-turbo", api_key_env="TEST_KEY", backoff=0.01)
        report = build([src], out, [images], BuildConfig(workers=0, translate=tr))
    assert stub.calls == 2 and len(stub.texts) == 3  # one failure, then one batched request of three texts
    recs = read_out(out)
    assert recs[0]["conversations"][1]["value"] == "译文:Axial CT image number 0 shows a mass in the right lung."
    assert recs[0]["source_text"] == {"caption": "Axial CT image number 0 shows a mass in the right lung."}
    assert "source_text" not in recs[3] and recs[3]["conversations"][1]["value"].startswith("胸部CT")
    t = report["translation"]
    assert (t["retries"], t["requested"], t["requests"]) == (1, 3, 2)


def test_interrupted_translation_resumes_from_cache(tmp_path):
    src, images = english_oa(tmp_path, 6)
    out = tmp_path / "zh.jsonl"
    cfg = lambda url: BuildConfig(  # noqa: E731
        workers=0, translate=TranslateConfig(url, "m", batch_size=2, retries=1, backoff=0.01))
    with Stub(fail_after=2) as stub, pytest.raises(UserError, match="run the same command again to resume"):
        build([src], out, [images], cfg(stub.url))
    first = list(stub.texts)
    assert len(first) == 2 and not out.exists()  # no complete-looking output from a failed run
    with Stub() as stub:
        report = build([src], out, [images], cfg(stub.url))
    assert len(stub.texts) == 4 and not set(first) & set(stub.texts)  # cached texts are not paid twice
    assert report["translation"]["cached"] == 2 and len(read_out(out)) == 7
    with Stub() as stub:  # a rerun with everything cached sends nothing
        build([src], tmp_path / "again.jsonl", [images], BuildConfig(
            workers=0, translate=TranslateConfig(stub.url, "m", cache=out.with_suffix(".translations.sqlite"))))
    assert stub.calls == 0


# ---------------------------------------------------------------- scale and CLI


def test_large_jsonl_is_streamed(tmp_path):
    images = tmp_path / "img"
    make_images(images, ["a.png"])
    n, caption = 3000, "胸部CT平扫示右肺上叶结节。" * 60  # ~2 KB per row in UTF-8
    src = write_jsonl(tmp_path / "big.jsonl", ({"id": f"r{i}", "image": "a.png", "caption": caption} for i in range(n)))
    size = src.stat().st_size
    tracemalloc.start()
    try:
        report = build([src], tmp_path / "big_out.jsonl", [images], BuildConfig(workers=0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report["written"] == n
    assert peak < size / 4, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB input: the input is not streamed"


def test_cli_build_and_user_errors(casereport, tmp_path, monkeypatch, capsys):
    src, images = casereport
    out = tmp_path / "cli.jsonl"
    code, stdout, _ = run_cli(monkeypatch, capsys, "data", "build", src, "--out", out, "--image-folder", images,
                              "--task", "align", "--workers", "0")
    assert code == 0 and "wrote 2 records" in stdout and "too_many_images" in stdout
    code, _, err = run_cli(monkeypatch, capsys, "data", "build", src, "--out", out, "--max-images", "5")
    assert code == 2 and err.count("\n") == 1 and "--max-images" in err
    code, stdout, _ = run_cli(monkeypatch, capsys, "data", "build", src, "--out", tmp_path / "sep.jsonl",
                              "--image-folder", images, "--task", "align", "--images", "separate")
    assert code == 0 and "wrote 2 records" in stdout
    assert read_out(tmp_path / "sep.jsonl")[1]["image"] == [f"figures/PMC1_F{i}.jpg" for i in (1, 2, 3)]
    code, _, err = run_cli(monkeypatch, capsys, "data", "build", src, "--out", out, "--images", "tiles")
    assert code == 2 and err.count("\n") == 1 and "--images must be composite or separate" in err
    code, _, err = run_cli(monkeypatch, capsys, "data", "build", src, "--out", out, "--translate-url", "http://x")
    assert code == 2 and "--translate-model" in err
