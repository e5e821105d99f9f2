"""Several images per question, the two ways the field uses, chosen by the template: joined into one composite
(ChiMed-VL; `vicuna_v1`, `plain`) or each image its own image tokens (HuatuoGPT-Vision, LLaVA-1.5 multi-image;
`huatuo`, `chatml`). `data inspect`, the training dataset and a training step all see the same count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli_captured, tiny_recipe

from qilin_lite.families import get_template
from qilin_lite.data.records import read_records
from qilin_lite.encoding import IGNORE, encode

QUESTION, ANSWER = "病灶位于哪一侧？", "右侧"  # words the tiny tokenizer knows


@pytest.fixture(scope="module")
def two_image_data(tiny_data, tmp_path_factory):
    images = sorted(Path(tiny_data["images"]).glob("img_*.png"))
    rows = [{"id": f"pair{i}", "image": [images[2 * i].name, images[2 * i + 1].name],
             "conversations": [{"from": "human", "value": f"<image>\n<image>\n{QUESTION}"},
                               {"from": "gpt", "value": ANSWER}]} for i in range(4)]
    f = tmp_path_factory.mktemp("pairs") / "pairs.json"
    f.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return f


@pytest.mark.parametrize("template,runs", [("vicuna_v1", 1), ("huatuo", 2), ("chatml", 2)])
def test_inspect_shows_one_composite_or_separate_images(template, runs, two_image_data, tiny_base, tiny_data,
                                                        tok_layout, monkeypatch, capsys):
    tok, layout = tok_layout
    args = ["data", "inspect", two_image_data, "--model", tiny_base, "--image-folder", tiny_data["images"], "-n", "1",
            "--template", template]
    code, out, err = run_cli_captured(monkeypatch, capsys, *args, "--no-color")
    assert code == 0, err
    head, body = out.splitlines()[:2]
    per = layout.num_image_tokens
    mode = get_template(template).multi_image
    assert f"({runs * per} image: {runs} image(s) of {per}, {mode})" in head
    assert body.count(f"<image ×{per}>") == runs
    row = json.loads(run_cli_captured(monkeypatch, capsys, *args, "--json")[1])
    assert row["input_ids"].count(layout.image_token_id) == runs * per
    supervised = [i for i, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE]
    assert tok.decode(supervised).replace(" ", "").startswith(ANSWER.replace(" ", ""))
    assert all(lab == IGNORE for i, lab in zip(row["input_ids"], row["labels"]) if i == layout.image_token_id)


def test_data_build_separate_gives_the_model_each_image(two_image_data, tiny_base, tiny_data, tok_layout, tmp_path,
                                                        monkeypatch, capsys):
    """`data build --images separate` keeps a two-image record's images apart: the built file shows a huatuo-template
    model 2 image runs (a vicuna_v1 one still 1 composite), where the default build bakes one composite in."""
    from qilin_lite.data.build import BuildConfig, build

    _, layout = tok_layout
    runs = {}
    for images in ("separate", "composite"):
        out = tmp_path / f"{images}.jsonl"
        build([two_image_data], out, [tiny_data["images"]], BuildConfig(workers=0, images=images))
        first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
        for template in ("huatuo", "vicuna_v1"):
            args = ["data", "inspect", out, "--model", tiny_base, "-n", "1", "--template", template, "--json"]
            code, stdout, err = run_cli_captured(monkeypatch, capsys, *args)
            assert code == 0, err
            row = json.loads(stdout)
            runs[images, template] = row["input_ids"].count(layout.image_token_id) // layout.num_image_tokens
        if images == "separate":
            assert len(first["image"]) == 2 and first["conversations"][0]["value"] == f"<image>\n<image>\n{QUESTION}"
    assert runs == {("separate", "huatuo"): 2, ("separate", "vicuna_v1"): 1,
                    ("composite", "huatuo"): 1, ("composite", "vicuna_v1"): 1}


@pytest.mark.parametrize("template,rows", [("vicuna_v1", 1), ("huatuo", 2)])
def test_the_training_dataset_shows_the_model_as_many_images(template, rows, two_image_data, tiny_base, tiny_data,
                                                             tok_layout):
    """pixel_values rows = image runs in input_ids: the composite is made from the record's images in order."""
    from qilin_lite.model import load_image_processor
    from qilin_lite.images.pixel_values import ImageLoader
    from qilin_lite.train.dataset import VisionTextDataset

    tok, layout = tok_layout
    recs = read_records(two_image_data, tiny_data["images"])
    t = get_template(template)
    ds = VisionTextDataset(recs, tok, ImageLoader(load_image_processor(str(tiny_base)), "pad"), t, layout,
                           lengths=[0] * len(recs))
    item = ds[0]
    assert item["pixel_values"].shape[0] == rows
    assert int((item["input_ids"] == layout.image_token_id).sum()) == rows * layout.num_image_tokens
    ids, _ = encode(recs[0].messages, t, tok, layout)
    assert ids.tolist() == item["input_ids"].tolist()


def test_a_separate_image_run_trains(two_image_data, tiny_base, tiny_data, tmp_path):
    from qilin_lite.model import RunInfo
    from qilin_lite.train.stage import train_stage

    out = tmp_path / "tune"
    recipe = tiny_recipe("tune", "lora", out, two_image_data, Path(tiny_data["images"]), **{
        "model.base": str(tiny_base), "data.template": "huatuo", "train.max_steps": 1})
    train_stage(recipe)
    assert RunInfo.load(out).template == "huatuo"
    summary = json.loads((out / "train_summary.json").read_text())
    # the first step's loss (LoRA starts as the identity) is the base model's on the 4 records, each shown 2 images
    import torch

    from qilin_lite.model import load_vlm, load_tokenizer_and_processor, token_layout
    from qilin_lite.images.pixel_values import ImageLoader
    from qilin_lite.train.collator import Collator
    from qilin_lite.train.dataset import VisionTextDataset

    model = load_vlm(str(tiny_base), dtype="float32", attn="sdpa").eval()
    tok, ip = load_tokenizer_and_processor(str(tiny_base))
    recs = read_records(two_image_data, tiny_data["images"])
    ds = VisionTextDataset(recs, tok, ImageLoader(ip, "pad"), get_template("huatuo"),
                           token_layout(model.config, 256), lengths=[0] * 4)
    batch = Collator(tok.pad_token_id)([ds[i] for i in range(4)])
    assert batch["pixel_values"].shape[0] == 8
    with torch.no_grad():
        want = model(**batch).loss.item()
    assert abs(summary["final_loss"] - want) < 1e-3 * max(1.0, want)


def test_too_many_images_is_the_records_problem(tiny_base, tok_layout):
    from qilin_lite.data.records import BadRecord

    tok, layout = tok_layout
    msgs = [{"role": "user", "content": "<image>" * 7 + QUESTION}, {"role": "assistant", "content": ANSWER}]
    with pytest.raises(BadRecord, match="7 images; the huatuo template takes at most 6"):
        encode(msgs, get_template("huatuo"), tok, layout)
    with pytest.raises(BadRecord, match="5 images; the vicuna_v1 template takes at most 4"):
        encode([{**msgs[0], "content": "<image>" * 5 + QUESTION}, msgs[1]], get_template("vicuna_v1"), tok, layout)


def test_a_packed_row_carries_every_samples_images_in_order(two_image_data, tiny_base, tiny_data, tok_layout):
    """Packing counts separate images right: a row of four two-image records holds 8 images' tokens and 8 pixel
    rows, and the model's loss on the row equals the mean over the same samples unpacked (segments attend apart)."""
    import numpy as np
    import torch

    from qilin_lite.train import segments
    from qilin_lite.model import load_vlm, load_tokenizer_and_processor
    from qilin_lite.train.packing import PackedDataset
    from qilin_lite.images.pixel_values import ImageLoader
    from qilin_lite.train.collator import Collator
    from qilin_lite.train.dataset import VisionTextDataset

    tok, layout = tok_layout
    _, ip = load_tokenizer_and_processor(str(tiny_base))
    recs = read_records(two_image_data, tiny_data["images"])
    ds = VisionTextDataset(recs, tok, ImageLoader(ip, "pad"), get_template("huatuo"), layout, np.zeros(4, np.int64))
    items = [ds[i] for i in range(4)]
    ds.lengths = np.array([len(it["input_ids"]) for it in items])
    row = PackedDataset(ds, max_length=int(ds.lengths.sum()))[0]
    assert row["pixel_values"].shape[0] == 8
    assert int((row["input_ids"] == layout.image_token_id).sum()) == 8 * layout.num_image_tokens
    model = load_vlm(str(tiny_base), dtype="float32", attn="sdpa").eval()
    collate = Collator(tok.pad_token_id)
    with torch.no_grad():
        segments.use(model, segments.SEGMENTS)
        packed = model(**collate([row])).loss.item()
        segments.use(model, "sdpa")
        unpacked = model(**collate(items)).loss.item()
    assert abs(packed - unpacked) < 1e-4
