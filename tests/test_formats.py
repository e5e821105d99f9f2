"""Every common multimodal data layout reads into the same records (docs/data.md shows each):
LLaVA JSON / JSONL, ShareGPT / OpenAI `messages` + `images` (LLaMA-Factory, ms-swift), trl's typed content parts,
with or without `id`, and Hugging Face datasets with one image or a list of images per row."""

from __future__ import annotations

import json

import pytest

from qilin_lite.data.records import read_records

Q, A = "病灶位于哪一侧？", "左侧"


@pytest.fixture
def images(tmp_path):
    from PIL import Image

    for i, colour in enumerate([(200, 10, 10), (10, 200, 10)]):
        Image.new("RGB", (32, 24), colour).save(tmp_path / f"img{i}.png")
    return tmp_path


def _same_as_llava(recs, n_images=1):
    assert len(recs) == 1
    r = recs[0]
    assert [m["role"] for m in r.messages] == ["user", "assistant"]
    assert r.messages[0]["content"].replace("\n", "") == "<image>" * n_images + Q
    assert r.messages[1]["content"] == A
    assert len(r.images) == n_images
    return r


LAYOUTS = {
    "llava": {"id": "r1", "image": "img0.png",
              "conversations": [{"from": "human", "value": f"<image>\n{Q}"}, {"from": "gpt", "value": A}]},
    # LLaMA-Factory's data/mllm_demo.json and ms-swift: no id, `images` a list
    "sharegpt-openai": {"messages": [{"role": "user", "content": f"<image>{Q}"}, {"role": "assistant", "content": A}],
                        "images": ["img0.png"]},
    # trl: typed content parts
    "trl-parts": {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]},
                               {"role": "assistant", "content": [{"type": "text", "text": A}]}],
                  "images": ["img0.png"]},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_layouts(images, layout, suffix):
    row = LAYOUTS[layout]
    f = images / f"data{suffix}"
    f.write_text(json.dumps([row], ensure_ascii=False) if suffix == ".json" else json.dumps(row, ensure_ascii=False),
                 encoding="utf-8")
    r = _same_as_llava(read_records(f, images))
    assert r.id == ("r1" if "id" in row else f"data{suffix}:1")  # no id: the file and line stand in


def test_records_without_id_are_named_by_line_in_errors(images):
    f = images / "d.jsonl"
    good = LAYOUTS["sharegpt-openai"]
    bad = dict(good, images=["nope.png"])
    f.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in (good, bad)), encoding="utf-8")
    from qilin_lite.errors import UserError

    with pytest.raises(UserError, match=r"d\.jsonl:2 \(d\.jsonl:2\)|d\.jsonl:2"):
        read_records(f, images)
    assert [r.id for r in read_records(f, images, skip_bad=True)] == ["d.jsonl:1"]


@pytest.mark.parametrize("kind", ["one image", "list of images"])
def test_hf_datasets(images, tmp_path, kind):
    import datasets
    from PIL import Image

    imgs = [Image.open(images / "img0.png"), Image.open(images / "img1.png")]
    if kind == "one image":
        ds = datasets.Dataset.from_dict({
            "messages": [[{"role": "user", "content": f"<image>\n{Q}"}, {"role": "assistant", "content": A}]],
            "image": [imgs[0]]}).cast_column("image", datasets.Image())
        n = 1
    else:
        ds = datasets.Dataset.from_dict({
            "messages": [[{"role": "user", "content": f"<image><image>\n{Q}"}, {"role": "assistant", "content": A}]],
            "images": [imgs]})
        n = 2
    ds.save_to_disk(str(tmp_path / "ds"))
    r = _same_as_llava(read_records(str(tmp_path / "ds")), n_images=n)
    opened = [li.open() for li in r.images]
    assert [im.getpixel((0, 0)) for im in opened] == [(200, 10, 10), (10, 200, 10)][:n]
