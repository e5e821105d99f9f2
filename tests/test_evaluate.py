"""Benchmark layouts -> EvalItems, the eval output directory, resume, --predictions scoring and compare."""

import csv
import json
from pathlib import Path

import pytest

from qilin_lite.errors import UserError
from qilin_lite.eval import EvalItem, compare, format_prompt, load_eval_items, run_eval


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def touch_images(items) -> None:
    for it in items:
        if it.image:
            Path(it.image).parent.mkdir(parents=True, exist_ok=True)
            Path(it.image).write_bytes(b"")


# ---------------------------------------------------------------- layouts


def test_pmc_vqa_csv(tmp_path):
    path = tmp_path / "test_clean.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]
        )
        w.writerow(["PMC1_F1.jpg", "最可能的诊断是？", "肺炎", "A:胸腔积液", "B:肺炎", "C:气胸", "D:肺不张", "B"])
        # No Choice D and no Answer_label: the label comes from matching the Answer text.
        w.writerow(["PMC2_F3.jpg", "Which modality?", "CT", " A:MRI ", " B:CT ", " C:X-ray", "", ""])
    items = load_eval_items(path, "pmc-vqa", image_folder=tmp_path / "figures")
    assert items[0] == EvalItem(
        "0", str(tmp_path / "figures" / "PMC1_F1.jpg"), "最可能的诊断是？", "B", "pmc-vqa", "choice",
        ["胸腔积液", "肺炎", "气胸", "肺不张"], None,
    )
    assert items[1].choices == ["MRI", "CT", "X-ray"] and items[1].reference == "B" and items[1].id == "1"
    assert format_prompt(items[0]) == "最可能的诊断是？\nA. 胸腔积液\nB. 肺炎\nC. 气胸\nD. 肺不张\n请直接回答选项字母。"
    assert format_prompt(items[1]).endswith("Answer with the option's letter from the given choices directly.")


def test_pmc_vqa_bad_rows(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("Figure_path,Question,Choice A,Choice B,Answer_label\na.jpg,Q?,A:x,B:y,E\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"test\.csv:2 \(0\): Answer_label 'E' is not one of A, B"):
        load_eval_items(path, "pmc-vqa")
    path.write_text("Figure,Question\na.jpg,Q?\n", encoding="utf-8")
    with pytest.raises(UserError, match="not a PMC-VQA CSV"):
        load_eval_items(path, "pmc-vqa")


def test_vqa_rad_json_keeps_the_test_split(tmp_path):
    records = [
        {"qid": 1, "image_name": "synpic1.jpg", "question": "Is there a fracture?", "answer": "No",
         "answer_type": "CLOSED", "phrase_type": "test_freeform"},
        {"qid": 2, "image_name": "synpic1.jpg", "question": "How many lesions?", "answer": 2,
         "answer_type": "OPEN ", "phrase_type": "test_para"},
        {"qid": 3, "image_name": "synpic2.jpg", "question": "Train question?", "answer": "yes",
         "answer_type": "CLOSED", "phrase_type": "freeform"},
    ]
    items = load_eval_items(write_json(tmp_path / "VQA_RAD Dataset Public.json", records), "vqa-rad", tmp_path / "img")
    assert [(it.id, it.kind, it.reference) for it in items] == [("1", "closed", "No"), ("2", "open", "2")]
    assert items[0].image == str(tmp_path / "img" / "synpic1.jpg")


def test_slake_json(tmp_path):
    records = [
        {"qid": 11, "img_name": "xmlab1/source.jpg", "question": "Is this a CT?", "answer": "Yes",
         "answer_type": "CLOSED", "q_lang": "en"},
        {"qid": 12, "img_name": "xmlab1/source.jpg", "question": "图中有肝脏吗?", "answer": "有",
         "answer_type": "CLOSED", "q_lang": "zh"},
        {"qid": 13, "img_name": "xmlab1/source.jpg", "question": "病灶在哪里?", "answer": "左肺",
         "answer_type": "OPEN", "q_lang": "zh"},
    ]
    items = load_eval_items(write_json(tmp_path / "test.json", records), "slake", tmp_path / "imgs")
    assert [(it.id, it.kind, it.lang) for it in items] == [
        ("11", "closed", "en"), ("12", "closed", "zh"), ("13", "open", "zh")
    ]
    assert items[0].image == str(tmp_path / "imgs" / "xmlab1" / "source.jpg")


def test_pathvqa_llava_conversation_and_plain_list(tmp_path):
    conv = [
        {"id": "p1", "image": "test_0001.jpg", "answer_type": "CLOSED", "conversations": [
            {"from": "human", "value": "<image>\nIs this tissue inflamed?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "p2", "image": "test_0002.jpg", "answer_type": "OPEN",  # LLaVA-Med's misspelt key
         "conversatons": [{"from": "human", "value": "What is shown?<image>"}, {"from": "gpt", "value": "granuloma"}]},
    ]
    items = load_eval_items(write_json(tmp_path / "test.json", conv), "pathvqa", tmp_path)
    assert [(it.id, it.question, it.reference, it.kind) for it in items] == [
        ("p1", "Is this tissue inflamed?", "yes", "closed"), ("p2", "What is shown?", "granuloma", "open")
    ]
    # A plain list with no answer_type and no ids: yes/no answers are closed, ids are positions.
    plain = [{"image": "a.jpg", "question": "Is it benign?", "answer": "no"},
             {"image": "b.jpg", "question": "What stain?", "answer": "H&E"}]
    path = tmp_path / "pvqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in plain) + "\n", encoding="utf-8")
    items = load_eval_items(path, "pathvqa")
    assert [(it.id, it.kind, it.image) for it in items] == [
        ("0", "closed", str(tmp_path / "a.jpg")), ("1", "open", str(tmp_path / "b.jpg"))
    ]


def test_caption_layouts(tmp_path):
    data = [
        {"id": "c1", "image": "x.png", "conversations": [
            {"from": "human", "value": "<image>\n描述这张图像"}, {"from": "gpt", "value": "胸部正位片，未见异常。"}]},
        {"id": "c2", "image": "y.png", "caption": "Axial CT of the abdomen."},
    ]
    items = load_eval_items(write_json(tmp_path / "cap.json", data), "caption")
    assert [(it.question, it.reference, it.kind) for it in items] == [
        ("描述这张图像", "胸部正位片，未见异常。", "caption"), ("请描述这张图片。", "Axial CT of the abdomen.", "caption")
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"qid": 1, "img_name": "a.jpg", "answer": "yes"}]', r"bad\.json \(1\): question is missing"),
        ('[{"qid": 1, "img_name": "a.jpg", "question": "Q?", "answer": "yes", "answer_type": "MAYBE"}]',
         r"bad\.json \(1\): answer_type 'MAYBE' is neither CLOSED nor OPEN"),
        ('[{"qid": 1, "question": "Q?", "answer": "yes"}]', r"bad\.json \(1\): image name"),
        ('[{"qid": 1, "img_name": "a.jpg", "question": "Q?", "answer": ""}]', r"bad\.json \(1\): answer is missing"),
        ('[{"qid": 1, "img_name": "a.jpg", "question": "Q?", "answer": "no"}, "oops"]',
         r"bad\.json \(record 1\): expected a JSON object"),
        ('[{"id": 1, "image": "a.jpg", "conversations": [{"from": "human", "value": "Q"}]}]',
         r"bad\.json \(1\): conversations need a human turn followed by a gpt turn"),
        ('[{"qid": 7, "img_name": "a.jpg", "question": "Q?", "answer": "no"},'
         ' {"qid": 7, "img_name": "b.jpg", "question": "R?", "answer": "yes"}]',
         r"bad\.json \(7\): id used by records 0 and 1"),
        ('{"data": []}', r"bad\.json: expected a JSON list"),
        ('[{"qid": 1,', r"bad\.json:1: not valid JSON"),
    ],
)
def test_malformed_records_name_file_and_record(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_eval_items(path, "slake")


def test_bad_jsonl_line_and_bad_task(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "a.jpg", "question": "Q?", "answer": "no"}\n{broken\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        load_eval_items(path, "pathvqa")
    with pytest.raises(UserError, match="unknown task 'vqa'"):
        load_eval_items(path, "vqa")
    with pytest.raises(UserError, match="no such data file"):
        load_eval_items(tmp_path / "missing.json", "slake")


# ---------------------------------------------------------------- run_eval, resume, --predictions

ANSWERS = {"11": "Yes", "12": "没有", "13": "左肺上叶", "14": "no", "15": "肝脏", "16": "yes, no doubt", "17": "是的"}


@pytest.fixture
def slake_items(tmp_path):
    rows = [
        (11, "Is this a CT?", "Yes", "CLOSED", "en"),
        (12, "图中有肝脏吗?", "有", "CLOSED", "zh"),
        (13, "病灶在哪里?", "左肺", "OPEN", "zh"),
        (14, "Is there a mass?", "No", "CLOSED", "en"),
        (15, "哪个器官最大?", "肝脏", "OPEN", "zh"),
        (16, "Is it abnormal?", "No", "CLOSED", "en"),
        (17, "是否有积液?", "是", "CLOSED", "zh"),
    ]
    records = [{"qid": q, "img_name": "xmlab1/source.jpg", "question": qu, "answer": a, "answer_type": t, "q_lang": l}
               for q, qu, a, t, l in rows]
    items = load_eval_items(write_json(tmp_path / "test.json", records), "slake", tmp_path / "imgs")
    touch_images(items)
    return items


class FakeModel:
    """Answers from a table; records what it was asked; optionally dies after `fail_after` answers."""

    def __init__(self, fail_after=None):
        self.asked, self.fail_after = [], fail_after

    def __call__(self, batch):
        if self.fail_after is not None and len(self.asked) + len(batch) > self.fail_after:
            raise RuntimeError("CUDA out of memory (simulated)")
        self.asked += [it.id for it in batch]
        return [ANSWERS[it.id] for it in batch]


def test_run_eval_writes_predictions_metrics_and_report(tmp_path, slake_items):
    metrics = run_eval(slake_items, FakeModel(), tmp_path / "out", batch_size=3)
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["id"] for x in lines] == ["11", "12", "13", "14", "15", "16", "17"]
    assert lines[1] == {
        "id": "12", "task": "slake", "kind": "closed", "lang": "zh", "image": slake_items[1].image,
        "question": "图中有肝脏吗?", "choices": None, "reference": "有", "prediction": "没有",
        "correct": False, "correct_llavamed": True, "extracted": "no",  # "有" is inside "没有"
    }
    assert lines[2]["correct"] == pytest.approx(1.0)  # 左 肺 both in 左肺上叶
    # closed (LLaVA-Med / strict): 11 T/T, 12 T/F (没有 vs 有), 14 T/T, 16 T/F ("yes, no doubt" vs no), 17 T/T
    # (是的 vs 是) -> LLaVA-Med 5/5, strict 3/5; en strict 2/3 (11, 14), zh strict 1/2 (17)
    groups = metrics["groups"]
    assert groups["all"]["n_closed"] == 5 and groups["all"]["n_open"] == 2
    assert groups["all"]["closed_llavamed"] == 1.0 and groups["all"]["closed_strict"] == 0.6
    assert groups["en"]["closed_strict"] == round(2 / 3, 6) and groups["zh"]["closed_strict"] == 0.5
    assert groups["zh"]["open_recall"] == 1.0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8")) == metrics
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| metric | all | en | zh |" in report
    ci = groups["all"]["ci95"]["closed_strict"]
    assert ci[0] < 0.6 < ci[1]
    assert f"| closed acc, strict | 60.00 [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] | 66.67 [" in report


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, slake_items):
    run_eval(slake_items, FakeModel(), tmp_path / "clean", batch_size=2)

    crashing = FakeModel(fail_after=4)
    with pytest.raises(RuntimeError, match="simulated"):
        run_eval(slake_items, crashing, tmp_path / "resumed", batch_size=2)
    pred = tmp_path / "resumed" / "predictions.jsonl"
    assert len(pred.read_text(encoding="utf-8").splitlines()) == 4  # two batches flushed before the crash
    with open(pred, "a", encoding="utf-8") as f:
        f.write('{"id": "15", "task": "slake", "predic')  # a line torn by the crash

    again = FakeModel()
    run_eval(slake_items, again, tmp_path / "resumed", batch_size=2)
    assert again.asked == ["15", "16", "17"]  # done items are not generated again; the torn one is
    assert (tmp_path / "resumed" / "metrics.json").read_bytes() == (tmp_path / "clean" / "metrics.json").read_bytes()
    ids = [json.loads(x)["id"] for x in pred.read_text(encoding="utf-8").splitlines()]
    assert ids == ["11", "12", "13", "14", "15", "16", "17"]

    pred.write_text(pred.read_text(encoding="utf-8").rstrip("\n"), encoding="utf-8")  # complete, newline lost
    third = FakeModel()
    run_eval(slake_items, third, tmp_path / "resumed")  # all done: nothing to generate, same metrics
    assert third.asked == []
    assert pred.read_text(encoding="utf-8").endswith("}\n")
    assert (tmp_path / "resumed" / "metrics.json").read_bytes() == (tmp_path / "clean" / "metrics.json").read_bytes()


def test_limit_and_resume_refuses_other_data(tmp_path, slake_items):
    metrics = run_eval(slake_items, FakeModel(), tmp_path / "out", limit=3)
    assert metrics["n"] == 3
    other = [EvalItem("11", None, "Q?", "a different answer", "slake", "open")]
    with pytest.raises(UserError, match=r"predictions\.jsonl:1 \(11\): written for other data"):
        run_eval(other, FakeModel(), tmp_path / "out")
    with pytest.raises(UserError, match="--limit must be at least 1"):
        run_eval(slake_items, FakeModel(), tmp_path / "out", limit=0)


def test_missing_image_fails_before_generating(tmp_path, slake_items):
    Path(slake_items[0].image).unlink()
    model = FakeModel()
    with pytest.raises(UserError, match=r"source\.jpg \(11\): image not found; check --image-folder"):
        run_eval(slake_items, model, tmp_path / "out")
    assert model.asked == []


def test_predictions_file_is_scored_without_a_model(tmp_path, slake_items):
    run_eval(slake_items, FakeModel(), tmp_path / "model")
    external = tmp_path / "answers.jsonl"  # LLaVA-Med's answer-file shape: question_id + text
    external.write_text(
        "".join(json.dumps({"question_id": int(k), "text": v}, ensure_ascii=False) + "\n" for k, v in ANSWERS.items()),
        encoding="utf-8",
    )
    metrics = run_eval(slake_items, None, tmp_path / "scored", predictions_file=external)
    assert metrics == json.loads((tmp_path / "model" / "metrics.json").read_text(encoding="utf-8"))

    external.write_text('{"question_id": 11, "text": "Yes"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"no prediction for 6 of 7 questions \(first id 12\)"):
        run_eval(slake_items, None, tmp_path / "scored", predictions_file=external)
    external.write_text('{"question_id": 11, "score": 1}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"answers\.jsonl:1: needs an id .* and an answer"):
        run_eval(slake_items, None, tmp_path / "scored", predictions_file=external)
    with pytest.raises(UserError, match="not both"):
        run_eval(slake_items, FakeModel(), tmp_path / "scored", predictions_file=external)


def test_malformed_and_empty_model_answers_are_scored_wrong(tmp_path, slake_items):
    metrics = run_eval(slake_items, lambda batch: [None, ""] + [42] * (len(batch) - 2), tmp_path / "out", batch_size=8)
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["prediction"] for x in lines[:3]] == ["", "", "42"]
    assert metrics["groups"]["all"]["closed_strict"] == 0.0 and metrics["groups"]["all"]["open_recall"] == 0.0


def test_choice_run_and_compare_table(tmp_path):
    items = [
        EvalItem(str(i), None, "诊断？", label, "pmc-vqa", "choice", ["胸腔积液", "肺炎", "气胸", "肺不张"])
        for i, label in enumerate("BAC")
    ]
    good = {"0": "B", "1": "答案是A", "2": "气胸"}
    bad = {"0": "B", "1": "不确定", "2": "A"}
    run_eval(items, lambda b: [good[it.id] for it in b], tmp_path / "good")
    run_eval(items, lambda b: [bad[it.id] for it in b], tmp_path / "bad")
    table = compare([tmp_path / "good", tmp_path / "bad" / "predictions.jsonl", tmp_path / "good" / "metrics.json"])
    assert table.splitlines()[:7] == [
        "| metric | good | bad | good (2) |",
        "|---|---|---|---|",
        "| task | pmc-vqa | pmc-vqa | pmc-vqa |",
        "| n | 3 | 3 | 3 |",
        "| n (choice) | 3 | 3 | 3 |",
        "| accuracy | 100.00 [100.0, 100.0] | 33.33 [0.0, 100.0] | 100.00 [100.0, 100.0] |",
        "| no option found (count) | 0 | 1 | 0 |",
    ]
    # two questions differ (good right, bad wrong): McNemar's exact p = 2 * (1/2)^2 = 0.5
    assert "| accuracy | bad − good | 3 | -66.67 | [" in table and "| 0.5 | mcnemar-exact | no |" in table
    assert "| accuracy | good (2) − good | 3 | +0.00 | [+0.00, +0.00] | 1 | mcnemar-exact | no |" in table


def test_compare_languages_and_bad_inputs(tmp_path, slake_items):
    run_eval(slake_items, FakeModel(), tmp_path / "run1")
    table = compare([tmp_path / "run1"])
    assert "| closed acc, LLaVA-Med rule [zh] | 100.00 [100.0, 100.0] |" in table
    assert "| open recall [zh] | 100.00 [100.0, 100.0] |" in table
    (tmp_path / "other.json").write_text('{"accuracy": 1}', encoding="utf-8")
    with pytest.raises(UserError, match="not a metrics.json"):
        compare([tmp_path / "other.json"])
    with pytest.raises(UserError, match="no such file or directory"):
        compare([tmp_path / "nope.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics.json or predictions.jsonl"):
        compare([tmp_path / "empty"])
