"""OmniMedVQA and MMMU Health & Medicine: read in their published layouts, asked in their authors' prompts, scored by
their authors' rules.

tests/data/newer_cases.json holds what the authors' own functions return for a set of answers: MMMU's
`parse_multi_choice_response` and `parse_open_response` + `eval_open` (MMMU-Benchmark/MMMU eval/eval_utils.py) and OmniMedVQA's `find_most_similar_index`
(OpenGVLab/Multi-Modality-Arena MedicalEval/Question-answering_Score/utils/medicalqa.py), run unchanged in a scratch
directory. `expected` is null where theirs draws a random letter (MMMU, nothing found) or finds no similar option
(OmniMedVQA: counted wrong).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from qilin_lite.errors import UserError
from qilin_lite.eval import format_prompt, load_eval_items
from qilin_lite.eval.mmmu import mmmu_choice, mmmu_short_correct
from qilin_lite.eval.omnimedvqa import omnimedvqa_choice
from qilin_lite.eval.run import run_eval

CASES = json.loads((Path(__file__).parent / "data" / "newer_cases.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", CASES["mmmu"], ids=lambda c: c["response"][:20])
def test_mmmu_parsing_is_the_authors(case):
    got = mmmu_choice(case["response"], case["options"], "q1")
    if case["expected"] is None:  # theirs is random here; ours is seeded by the question
        assert got in "ABCD"[: len(case["options"])] and got == mmmu_choice(case["response"], case["options"], "q1")
    else:
        assert got == case["expected"]


@pytest.mark.parametrize("case", CASES["mmmu_short"], ids=lambda c: f"{c['reference']}-{c['response'][:16]}")
def test_mmmu_open_answers_are_scored_as_the_authors_do(case):
    assert mmmu_short_correct(case["response"], case["reference"]) is case["expected"]


@pytest.mark.parametrize("case", CASES["omnimedvqa"], ids=lambda c: c["response"][:20])
def test_omnimedvqa_matching_is_the_authors(case):
    assert omnimedvqa_choice(case["response"], case["options"]) == case["expected"]


def test_omnimedvqa_in_its_published_layout(tmp_path):
    from PIL import Image

    root = tmp_path / "OmniMedVQA"
    qa = root / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    (root / "Images" / "ACRIMA").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(root / "Images" / "ACRIMA" / "a.png")
    rows = [{"question_id": "ACRIMA_0", "question_type": "Disease Diagnosis", "question": "What is the diagnosis?",
             "gt_answer": "Glaucoma", "image_path": "Images/ACRIMA/a.png", "option_A": "Normal", "option_B": "Glaucoma",
             "modality_type": "Fundus Photography", "dataset": "ACRIMA"},
            {"question_id": "ACRIMA_1", "question_type": "Modality Recognition", "question": "Which modality?",
             "gt_answer": "Fundus", "image_path": "Images/ACRIMA/a.png", "option_A": "CT", "option_B": "MR",
             "option_C": "Fundus", "option_D": "X-Ray", "modality_type": "Fundus Photography", "dataset": "ACRIMA"}]
    (qa / "ACRIMA.json").write_text(json.dumps(rows), encoding="utf-8")
    items = load_eval_items(qa, "omnimedvqa")  # the folder, or one file
    assert [it.id for it in items] == ["ACRIMA_0", "ACRIMA_1"] and items == load_eval_items(qa / "ACRIMA.json",
                                                                                            "omnimedvqa")
    assert items[0].image == str(root / "Images/ACRIMA/a.png") and items[0].reference == "B"
    assert format_prompt(items[0]) == ("What is the diagnosis?Here are 2 candidate answers:['Normal', 'Glaucoma'] "
                                       "Only return what you think is the correct answer from the candidate answers, "
                                       "do not return any other irrelevant text!")
    m = run_eval(items, lambda b: ["glaucoma", "CT"], tmp_path / "out")
    assert m["groups"]["all"]["accuracy"] == 0.5
    rows[0]["gt_answer"] = "Cataract"
    (qa / "ACRIMA.json").write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(UserError, match=r"ACRIMA.json \(ACRIMA_0\): gt_answer 'Cataract' is none of the options"):
        load_eval_items(qa, "omnimedvqa")


def test_mmmu_health_and_medicine_in_its_published_layout(tmp_path, monkeypatch):
    import pandas as pd
    from PIL import Image

    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def png(color, size=(30, 20)):
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    blank = {f"image_{k}": None for k in range(1, 8)}
    rows = [
        {"id": "validation_Clinical_Medicine_1", "question": "<image 1> and <image 2>: which shows effusion?",
         "options": "['The first', 'The second', 'Both']", "answer": "B", **blank, "image_1": png((255, 0, 0)),
         "image_2": png((0, 0, 255)), "question_type": "multiple-choice", "subfield": "Radiology"},
        {"id": "validation_Clinical_Medicine_2", "question": "What dose? <image 1>", "options": "[]", "answer": "20",
         **blank, "image_1": png((0, 0, 0)), "question_type": "open", "subfield": "Pharmacology"},
    ]
    root = tmp_path / "MMMU"
    for subject, data in (("Clinical_Medicine", rows), ("Art", rows[:1])):
        (root / subject).mkdir(parents=True)
        pd.DataFrame(data).to_parquet(root / subject / "validation-00000-of-00001.parquet")
    items = load_eval_items(root, "mmmu")
    # Art is not Health & Medicine; the open question is a short-answer item with MMMU's own prompt and rule
    assert [(it.id, it.kind) for it in items] == [("validation_Clinical_Medicine_1", "choice"),
                                                  ("validation_Clinical_Medicine_2", "short")]
    assert format_prompt(items[1]) == "What dose? <image 1>\nAnswer the question using a single word or phrase."
    item = items[0]
    assert item.choices == ["The first", "The second", "Both"] and item.reference == "B"
    assert format_prompt(item) == ("<image 1> and <image 2>: which shows effusion?\n(A) The first\n(B) The second\n"
                                   "(C) Both\n\nAnswer with the option's letter from the given choices directly.")
    with Image.open(item.image) as im:  # both images, joined into one composite in order of mention
        colors = {c for _, c in im.convert("RGB").getcolors(10**6)}
    assert (255, 0, 0) in colors and (0, 0, 255) in colors
    # a template that keeps images separate (HuatuoGPT-Vision, ChatML runs) is shown the two images themselves
    from qilin_lite.families import get_template

    assert item.shown(get_template("vicuna_v1")) == [item.image] and items[1].parts == ()
    separate = item.shown(get_template("huatuo"))
    assert len(separate) == 2
    firsts = []
    for path in separate:
        with Image.open(path) as im:
            firsts.append(im.convert("RGB").getpixel((0, 0)))
    assert firsts == [(255, 0, 0), (0, 0, 255)]  # in order of mention
    m = run_eval(items, lambda b: ["(B)", "The dose is 20 mg."], tmp_path / "out")
    assert m["groups"]["all"]["accuracy"] == 1.0 and m["groups"]["all"]["short_accuracy"] == 1.0
