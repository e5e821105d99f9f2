"""Each scoring rule on hand-made answers, with the expected numbers worked out by hand here."""

import math
from types import SimpleNamespace

import pytest

from qilin_lite.eval.matching import (
    closed_llavamed,
    closed_strict,
    corpus_bleu,
    extract_option,
    normalize_answer,
    normalize_text,
    open_recall,
    reference_yes_no,
    rouge_l,
    tokenize,
    yes_no,
)
from qilin_lite.eval.metrics import aggregate, score_item


def item(kind, reference, *, choices=None, lang=None, task="slake"):
    return SimpleNamespace(kind=kind, reference=reference, choices=choices, lang=lang, task=task)


# ---------------------------------------------------------------- text


def test_normalize_and_tokenize():
    assert normalize_text("Ｙｅｓ，It IS!") == "yes it is"  # full-width folded, punctuation gone
    assert normalize_text("3.5 cm, 1,000 cells.") == "3.5 cm 1000 cells"
    assert normalize_answer("The Two lesions") == "2 lesions"
    assert tokenize("CT显示：肺炎。") == ["ct", "显", "示", "肺", "炎"]
    assert tokenize("左肺 upper lobe") == ["左", "肺", "upper", "lobe"]
    assert tokenize("") == [] and tokenize(None) == []


# ---------------------------------------------------------------- multiple choice

CHOICES = ["A:胸腔积液", "B:肺炎", "C:气胸", "D:肺不张"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("（B）", "B"),
        ("Ｂ", "B"),  # full-width letter
        ("B: 肺炎", "B"),
        ("B 肺炎", "B"),
        ("选B", "B"),
        ("我选择 D", "D"),
        ("答案是B", "B"),
        ("答案：B", "B"),
        ("正确答案为 C", "C"),
        ("答案应该是选项A。", "A"),
        ("The answer is C", "C"),
        ("Answer: D. Atelectasis", "D"),
        ("肺炎", "B"),  # the option text itself
        ("该影像最符合肺炎的表现", "B"),  # exactly one option's text inside the answer
        ("答案：肺炎（B）", "B"),
        ("It is B", "B"),
        ("A is correct", "A"),
        # no option or two different ones -> None (scored wrong)
        ("A or B", None),
        ("A和B都有可能", None),
        ("答案是A，也可能答案是B", None),
        ("A lesion is seen", None),  # the article, not option A
        ("the answer is a tumor", None),  # lower-case "a" is never an option
        ("无法判断", None),
        ("", None),
        (None, None),
        (42, None),
    ],
)
def test_extract_option(text, expected):
    assert extract_option(text, CHOICES) == expected


def test_extract_option_prefers_the_longer_option_text():
    # "细菌性肺炎" contains option A's text too; the answer names option B.
    assert extract_option("考虑细菌性肺炎", ["肺炎", "细菌性肺炎", "结核", "肿瘤"]) == "B"
    assert extract_option("Pneumonia.", ["Effusion", "Pneumonia", "Pneumothorax", "Atelectasis"]) == "B"
    # Option texts match whole words: option B "y" is not inside "yes".
    assert extract_option("yes", ["x", "y"]) is None
    assert extract_option("It shows a mass in the left lung", ["right lung", "left lung"]) == "B"


# ---------------------------------------------------------------- closed questions


def test_yes_no_forms():
    assert [yes_no(t) for t in ["Yes.", "no", "是的", "不是", "没有", "无", "对", "不对", "有"]] == [
        "yes", "no", "yes", "no", "no", "no", "yes", "no", "yes"
    ]
    assert yes_no("是否有积液？有") == "yes"  # the echoed question word 是否 is skipped
    assert yes_no("有没有积液：没有") == "no"
    assert yes_no("无法判断") is None
    assert yes_no("normal findings") is None  # "no" only as a whole word
    assert reference_yes_no("没有") == "no" and reference_yes_no("有两个") is None


@pytest.mark.parametrize(
    "prediction, reference, llavamed, strict",
    [
        ("Yes", "yes", True, True),
        ("No, there is no effusion.", "no", True, True),
        # LLaVA-Med's rule is substring containment, so these differ:
        ("yes, no doubt", "no", True, False),  # contains "no"; first yes/no word is "yes"
        ("yes, no doubt", "yes", True, True),
        ("normal", "no", True, False),  # "no" is a substring of "normal"
        ("不是", "是", True, False),  # "是" is inside "不是"
        ("Left", "left", False, True),  # non-yes/no closed answer: LLaVA-Med wants a yes/no word
        ("是的", "有", False, True),  # strict maps both Chinese forms to yes
        ("没有", "否", False, True),
        ("", "yes", False, False),
        (None, "no", False, False),
    ],
)
def test_closed_llavamed_vs_strict(prediction, reference, llavamed, strict):
    assert closed_llavamed(prediction, reference) is llavamed
    assert closed_strict(prediction, reference) is strict


# ---------------------------------------------------------------- open questions


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("The left side", "left lung", 1 / 2),  # ref tokens {left, lung}; "left" found
        ("Left lung, upper lobe", "left lung", 1.0),
        ("左肺", "肺部", 1 / 2),  # by character: ref 肺 部, prediction 左 肺 -> 肺 found
        ("右肺上叶可见结节", "右肺上叶", 1.0),
        ("two", "2", 1.0),  # number words -> digits
        ("left left", "left lung", 1 / 2),  # repeats do not count twice
        ("", "left lung", 0.0),
        (None, "肺", 0.0),
    ],
)
def test_open_recall(prediction, reference, expected):
    assert open_recall(prediction, reference) == pytest.approx(expected)


# ---------------------------------------------------------------- captions


def test_corpus_bleu_and_rouge_by_hand():
    hyps = [tokenize("left lung mass seen"), tokenize("肺部感染")]
    refs = [tokenize("left lung mass noted"), tokenize("肺部感染明显")]
    # n-gram matches (clipped) / n-grams in the hypotheses, summed over both sentences:
    #   1-grams: left lung mass (3/4) + 肺 部 感 染 (4/4)          -> p1 = 7/8
    #   2-grams: left-lung lung-mass (2/3) + 肺部 部感 感染 (3/3)   -> p2 = 5/6
    #   3-grams: left-lung-mass (1/2) + 肺部感 部感染 (2/2)         -> p3 = 3/4
    #   4-grams: none of 1 + 肺部感染 (1/1)                        -> p4 = 1/2
    # lengths: hypotheses c = 4 + 4 = 8, references r = 4 + 6 = 10 -> BP = exp(1 - 10/8) = exp(-0.25)
    bp = math.exp(-0.25)
    expected = [
        bp * 7 / 8,
        bp * (7 / 8 * 5 / 6) ** (1 / 2),
        bp * (7 / 8 * 5 / 6 * 3 / 4) ** (1 / 3),
        bp * (7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** (1 / 4),
    ]
    assert corpus_bleu(hyps, refs) == pytest.approx(expected)
    assert corpus_bleu(hyps, refs)[0] == pytest.approx(0.6814507)

    # ROUGE-L: sentence 1 LCS = left lung mass = 3, P = 3/4, R = 3/4 -> F1 = 0.75
    #          sentence 2 LCS = 肺部感染 = 4, P = 4/4, R = 4/6 -> F1 = 2 * 1 * (2/3) / (1 + 2/3) = 0.8
    assert rouge_l(hyps[0], refs[0]) == pytest.approx(0.75)
    assert rouge_l(hyps[1], refs[1]) == pytest.approx(0.8)


def test_bleu_edge_cases():
    assert corpus_bleu([[]], [["a", "b"]]) == [0.0, 0.0, 0.0, 0.0]  # empty prediction
    # p1 = 1/1, no 2-gram in a 1-token hypothesis -> BLEU-2..4 = 0; c = 1 < r = 2 -> BP = exp(1 - 2) = e^-1
    assert corpus_bleu([["a"]], [["a", "b"]]) == pytest.approx([math.exp(-1), 0.0, 0.0, 0.0])
    assert corpus_bleu([["x", "y"]], [["a", "b"]]) == [0.0, 0.0, 0.0, 0.0]
    assert rouge_l([], ["a"]) == 0.0 and rouge_l(["x"], ["a"]) == 0.0


# ---------------------------------------------------------------- per item and aggregate


def test_score_item_records_extraction():
    s = score_item(item("choice", "B", choices=CHOICES, task="pmc-vqa"), "答案是B")
    assert s == {"correct": True, "extracted": "B"}
    s = score_item(item("closed", "no"), "yes, no doubt")
    assert s == {"correct": False, "correct_llavamed": True, "extracted": "yes"}
    assert score_item(item("open", "left lung"), "left")["correct"] == pytest.approx(0.5)
    assert score_item(item("caption", "左肺结节"), "左肺结节")["correct"] == pytest.approx(1.0)


def test_aggregate_splits_slake_languages():
    items = [
        item("closed", "Yes", lang="en"),
        item("closed", "No", lang="en"),
        item("open", "left lung", lang="en"),
        item("closed", "是", lang="zh"),
        item("open", "肺部", lang="zh"),
        item("closed", "否", lang="zh"),
    ]
    preds = ["Yes, it is.", "yes, no doubt", "the left side", "不是", "左肺", ""]
    # closed hits (LLaVA-Med / strict): T/T, T/F, -, T/F, -, F/F; open recall: 1/2, 1/2
    m = aggregate(items, preds)
    cis = {g: m["groups"][g].pop("ci95") for g in m["groups"]}
    assert cis["en"]["open_recall"] == [0.5, 0.5]  # one question: no spread
    assert m["task"] == "slake" and m["n"] == 6
    assert m["groups"]["all"] == {
        "n": 6, "n_closed": 4, "closed_llavamed": 0.75, "closed_strict": 0.25, "n_open": 2, "open_recall": 0.5
    }
    assert m["groups"]["en"] == {
        "n": 3, "n_closed": 2, "closed_llavamed": 1.0, "closed_strict": 0.5, "n_open": 1, "open_recall": 0.5
    }
    assert m["groups"]["zh"] == {
        "n": 3, "n_closed": 2, "closed_llavamed": 0.5, "closed_strict": 0.0, "n_open": 1, "open_recall": 0.5
    }


def test_aggregate_choice_and_caption():
    items = [item("choice", x, choices=CHOICES, task="pmc-vqa") for x in "BAC"]
    m = aggregate(items, ["B", "答案是C", "不确定"])  # right, wrong, no option
    assert m["groups"]["all"].pop("ci95")["accuracy"][0] == 0.0
    assert m["groups"]["all"] == {"n": 3, "n_choice": 3, "accuracy": round(1 / 3, 6), "n_no_option": 1}
    assert "en" not in m["groups"]

    caps = [item("caption", "left lung mass noted", task="caption"), item("caption", "肺部感染明显", task="caption")]
    m = aggregate(caps, ["left lung mass seen", "肺部感染"])["groups"]["all"]
    assert m["bleu1"] == pytest.approx(math.exp(-0.25) * 7 / 8, abs=1e-6)
    assert m["rougeL"] == pytest.approx((0.75 + 0.8) / 2)
    with pytest.raises(ValueError):
        aggregate(caps, ["only one"])
