"""The demo data: deterministic, balanced, and its labels are visible in the pixels (checked by hand-written rules)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qilin_lite.demo.data import (
    CHOICES,
    COUNTS,
    DemoDataSpec,
    chance_level,
    demo_texts,
    make_demo_data,
)
from qilin_lite.errors import UserError

SMALL = dict(n_align=24, n_tune=30, n_heldout=24)


@pytest.fixture(scope="module")
def default_data(tmp_path_factory) -> dict[str, Path]:
    return make_demo_data(tmp_path_factory.mktemp("demo"), DemoDataSpec())


@pytest.fixture(scope="module")
def count_data(tmp_path_factory) -> dict[str, Path]:
    spec = DemoDataSpec(n_align=30, n_tune=60, n_heldout=90, tasks=("side", "modality", "count"))
    return make_demo_data(tmp_path_factory.mktemp("demo_count"), spec)


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def pixels(paths: dict[str, Path], rec: dict) -> np.ndarray:
    return np.asarray(Image.open(paths["images"] / rec["image"]), dtype=np.float32)


# Hand-written rules: if these read the label off the image, the labels match the pixels.
def rule_side(img: np.ndarray) -> str:
    _, xs = np.nonzero(img >= img.max() - 25)  # the lesion is the brightest thing in every modality
    return "左侧" if xs.mean() < img.shape[1] / 2 else "右侧"


def rule_modality(img: np.ndarray) -> str:
    k = max(img.shape[0] // 16, 2)
    if img[-k:].mean() - img[:k].mean() > 50:  # X光 darkens to the top
        return "X光"
    corners = np.concatenate([img[:k, :k], img[:k, -k:], img[-k:, :k], img[-k:, -k:]])
    return "磁共振" if corners.mean() > 90 else "CT"


def rule_count(img: np.ndarray) -> str:
    """Connected bright regions (4-neighbour flood fill), ignoring specks of a few noisy pixels."""
    mask = img > 225
    seen = np.zeros_like(mask)
    blobs = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, size = [(y0, x0)], 0
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        blobs += size >= 5
    return COUNTS[blobs - 1] if 1 <= blobs <= 3 else f"{blobs}个"


RULES = {"side": rule_side, "modality": rule_modality, "count": rule_count}


def rule_accuracy(paths: dict[str, Path]) -> dict[str, float]:
    hits: dict[str, list[bool]] = {}
    for rec in load(paths["heldout"]):
        hits.setdefault(rec["task"], []).append(RULES[rec["task"]](pixels(paths, rec)) == rec["answer"])
    return {task: float(np.mean(h)) for task, h in hits.items()}


def test_labels_are_recoverable_from_pixels(default_data):
    acc = rule_accuracy(default_data)
    assert set(acc) == {"side", "modality"}
    assert all(a >= 0.98 for a in acc.values()), acc


def test_count_labels_are_recoverable_from_pixels(count_data):
    acc = rule_accuracy(count_data)
    assert set(acc) == {"side", "modality", "count"}
    assert all(a >= 0.98 for a in acc.values()), acc


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_demo_data(tmp_path / "a", DemoDataSpec(**SMALL, seed=3))
    b = make_demo_data(tmp_path / "b", DemoDataSpec(**SMALL, seed=3))
    c = make_demo_data(tmp_path / "c", DemoDataSpec(**SMALL, seed=4))
    for split in ("align", "tune", "heldout"):
        assert a[split].read_bytes() == b[split].read_bytes()
    names = sorted(p.name for p in a["images"].iterdir())
    assert names == sorted(p.name for p in b["images"].iterdir())
    assert all((a["images"] / n).read_bytes() == (b["images"] / n).read_bytes() for n in names)
    assert not any((a["images"] / n).read_bytes() == (c["images"] / n).read_bytes() for n in names)
    assert a["tune"].read_bytes() != c["tune"].read_bytes()


def test_classes_and_tasks_are_balanced(default_data):
    heldout = load(default_data["heldout"])
    by_task = Counter(r["task"] for r in heldout)
    assert by_task == {"side": 60, "modality": 60}
    for task in by_task:
        answers = Counter(r["answer"] for r in heldout if r["task"] == task)
        assert set(answers) == set(CHOICES[task])
        assert len(set(answers.values())) == 1, answers  # 120 items split evenly

    tune_first = Counter(r["conversations"][1]["value"] for r in load(default_data["tune"]))
    assert tune_first == {"左侧": 150, "右侧": 150, "CT": 100, "磁共振": 100, "X光": 100}

    captions = [r["conversations"][1]["value"] for r in load(default_data["align"])]
    for options in (CHOICES["side"], CHOICES["modality"]):
        counts = Counter(next(o for o in options if o in c) for c in captions)
        assert len(set(counts.values())) == 1 and sum(counts.values()) == 600, counts


def test_every_answer_is_canonical_and_captions_name_every_attribute(default_data):
    canonical = {a for options in CHOICES.values() for a in options}
    for rec in load(default_data["tune"]) + load(default_data["heldout"]):
        assert all(t["value"] in canonical for t in rec["conversations"][1::2])
    for rec in load(default_data["align"]):
        caption = rec["conversations"][1]["value"]
        assert sum(s in caption for s in CHOICES["side"]) == 1
        assert sum(m in caption for m in CHOICES["modality"]) == 1


def test_conversation_shape(default_data):
    for split in ("align", "tune", "heldout"):
        for rec in load(default_data[split]):
            turns = rec["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].count("<image>") == 1
            assert turns[0]["value"].startswith("<image>")
            assert all("<image>" not in t["value"] for t in turns[1:])
            if split == "align":
                assert turns[0]["value"] == "<image>"
    tune = load(default_data["tune"])
    two_turn = [r for r in tune if len(r["conversations"]) == 4]
    assert len(two_turn) == 120 and all(len(r["conversations"]) in (2, 4) for r in tune)
    assert all(len(r["conversations"]) == 2 for r in load(default_data["heldout"]))


def test_heldout_images_are_unseen(default_data):
    train = load(default_data["align"]) + load(default_data["tune"])
    heldout = load(default_data["heldout"])
    train_names = {r["image"] for r in train}
    assert not train_names & {r["image"] for r in heldout}
    train_pixels = {pixels(default_data, r).tobytes() for r in train}
    assert not any(pixels(default_data, r).tobytes() in train_pixels for r in heldout)
    ids = [r["id"] for r in train + heldout]
    assert len(ids) == len(set(ids))


def test_chance_level_is_below_half(default_data, count_data):
    heldout = load(default_data["heldout"])
    assert chance_level(heldout) == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert chance_level(load(count_data["heldout"])) < chance_level(heldout) <= 0.5
    assert all(r["choices"] == list(CHOICES[r["task"]]) for r in heldout)
    with pytest.raises(ValueError):
        chance_level([])


def test_chinese_file_names_exist_and_load(default_data):
    records = load(default_data["align"]) + load(default_data["tune"]) + load(default_data["heldout"])
    chinese = [r["image"] for r in records if not r["image"].isascii()]
    assert len(chinese) == 1320 // 50 + 1
    assert any(r["image"] in chinese for r in load(default_data["heldout"]))
    for name in chinese:
        with Image.open(default_data["images"] / name) as im:
            assert im.size == (64, 64)
    assert len(list(default_data["images"].iterdir())) == 1320


def test_demo_texts_cover_every_generated_string(default_data, count_data):
    with_count = DemoDataSpec(tasks=("side", "modality", "count"))
    for paths, spec in ((default_data, DemoDataSpec()), (count_data, with_count)):
        texts = set(demo_texts(spec))
        for split in ("align", "tune", "heldout"):
            for rec in load(paths[split]):
                for turn in rec["conversations"]:
                    value = turn["value"].removeprefix("<image>").removeprefix("\n")
                    assert not value or value in texts, value
    assert not any("两个" in t for t in demo_texts())  # without the count task no count strings leak in


def test_32px_images_still_show_their_labels(tmp_path):
    paths = make_demo_data(tmp_path, DemoDataSpec(n_align=1, n_tune=1, n_heldout=60, image_size=32))
    rec = load(paths["heldout"])[0]
    assert Image.open(paths["images"] / rec["image"]).size == (32, 32)
    assert all(a >= 0.98 for a in rule_accuracy(paths).values())


@pytest.mark.parametrize(
    "kwargs",
    [dict(tasks=("side", "colour")), dict(tasks=()), dict(tasks=("side", "side")), dict(n_tune=0), dict(image_size=16)],
)
def test_bad_spec_is_a_user_error(kwargs):
    with pytest.raises(UserError):
        DemoDataSpec(**kwargs)


def test_tasks_from_yaml_list_become_a_tuple():
    assert DemoDataSpec(tasks=["side"]).tasks == ("side",)
