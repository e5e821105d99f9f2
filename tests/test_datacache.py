"""The checked records live in an on-disk index beside the output; a restart on the same data reuses it (no image
decoded, no record tokenized), a changed image or data file is checked again, and only what changed is decoded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import tiny_recipe


@pytest.fixture
def setup(tmp_path, tiny_base, tiny_data):
    from transformers import AutoConfig

    from qilin_lite.model import load_tokenizer_and_processor

    images = tmp_path / "images"
    shutil.copytree(tiny_data["images"], images)
    data = tmp_path / "tune.json"
    shutil.copy(tiny_data["tune"], data)
    tok, ip = load_tokenizer_and_processor(str(tiny_base))
    recipe = tiny_recipe("tune", "lora", tmp_path / "run", data, images, **{"model.base": str(tiny_base)})
    return recipe, tok, ip, AutoConfig.from_pretrained(str(tiny_base)), data, images


def _build(setup, monkeypatch):
    """build_dataset, counting image decodes and tokenizer passes."""
    import qilin_lite.images.decode as images_mod
    import qilin_lite.train.data as train_mod
    from qilin_lite.train.data import build_dataset

    recipe, tok, ip, cfg, *_ = setup
    counts = {"decoded": 0, "length_passes": 0}
    real_load, real_lengths = images_mod.load_image, train_mod.sample_lengths

    def load(*a, **k):
        counts["decoded"] += 1
        return real_load(*a, **k)

    def lengths(*a, **k):
        counts["length_passes"] += 1
        return real_lengths(*a, **k)

    monkeypatch.setattr(images_mod, "load_image", load)
    monkeypatch.setattr(train_mod, "sample_lengths", lengths)
    ds, rejected = build_dataset(recipe, tok, ip, cfg, Path(recipe.output_dir))
    return ds, counts


def test_a_restart_reuses_the_checked_records(setup, monkeypatch):
    first, c1 = _build(setup, monkeypatch)
    assert c1["decoded"] == len(first) and c1["length_passes"] == 1
    second, c2 = _build(setup, monkeypatch)
    assert c2 == {"decoded": 0, "length_passes": 0}  # nothing checked again
    assert len(second) == len(first) and (second.lengths == first.lengths).all()
    for i in (0, len(first) - 1):
        a, b = first[i], second[i]
        assert (a["input_ids"] == b["input_ids"]).all() and (a["labels"] == b["labels"]).all()
        assert (a["pixel_values"] == b["pixel_values"]).all()


def test_a_changed_image_is_decoded_again_and_only_it(setup, monkeypatch):
    _build(setup, monkeypatch)
    images, data = setup[5], setup[4]
    one = images / json.loads(data.read_text(encoding="utf-8"))[0]["image"]
    os.utime(one, ns=(1, 1))  # same bytes, other modification time: identity changed
    _, c = _build(setup, monkeypatch)
    assert c == {"decoded": 1, "length_passes": 1}


def test_a_changed_data_file_is_checked_again(setup, monkeypatch):
    _build(setup, monkeypatch)
    data = setup[4]
    rows = json.loads(data.read_text(encoding="utf-8"))
    rows[0]["conversations"][1]["value"] = "右侧"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    ds, c = _build(setup, monkeypatch)
    assert c["length_passes"] == 1 and c["decoded"] == 0  # images unchanged: their verdicts are reused
    assert ds.records[0].messages[1]["content"] == "右侧"


def test_the_index_holds_no_python_object_per_record(setup, monkeypatch):
    """What the dataset keeps in memory per record: two int64 arrays; records are read from disk on access."""
    import pickle

    ds, _ = _build(setup, monkeypatch)
    index = ds.records
    assert index.offsets.dtype == index.lengths.dtype and index.offsets.dtype.name == "int64"
    assert not any(isinstance(v, list) for v in vars(index).values())
    blob = pickle.dumps(index)  # what a spawned DataLoader worker receives
    assert len(blob) < 2000 + 16 * len(index)
    clone = pickle.loads(blob)
    assert clone[3].id == index[3].id
