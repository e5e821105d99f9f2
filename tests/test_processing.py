"""Which tokens are supervised, how images expand, what truncation keeps, what the collator pads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qilin_lite.families import TEMPLATES, render
from qilin_lite.data.records import BadRecord
from qilin_lite.encoding import IGNORE, encode
from qilin_lite.train.collator import Collator

V1 = TEMPLATES["vicuna_v1"]
PLAIN = TEMPLATES["plain"]


def two_turns():
    return [
        {"role": "user", "content": "<image>\n病灶位于哪一侧？"},
        {"role": "assistant", "content": "左侧"},
        {"role": "user", "content": "这是什么类型的影像？"},
        {"role": "assistant", "content": "磁共振"},
    ]


def supervised_runs(ids, labels):
    """Contiguous runs of supervised ids."""
    runs, cur = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE:
            cur.append(int(i))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def test_render_vicuna_string_is_the_reference_format():
    r = render(two_turns(), V1)
    sys = V1.system
    assert r.text == f"{sys} USER: <image>\n病灶位于哪一侧？ ASSISTANT: 左侧</s>USER: 这是什么类型的影像？ ASSISTANT: 磁共振</s>"
    assert [r.text[s:e] for s, e in r.supervised] == [" 左侧</s>", " 磁共振</s>"]


def test_render_plain_is_image_then_caption_newline():
    msgs = [{"role": "user", "content": "<image>\nignored text"}, {"role": "assistant", "content": "CT图像，病灶位于左侧。"}]
    r = render(msgs, PLAIN)
    assert r.text == "<image>CT图像，病灶位于左侧。\n"
    assert [r.text[s:e] for s, e in r.supervised] == ["CT图像，病灶位于左侧。\n"]


def test_supervised_tokens_decode_to_exactly_the_replies_and_end_tokens(tok_layout):
    tok, layout = tok_layout
    ids, labels = encode(two_turns(), V1, tok, layout)
    runs = supervised_runs(ids, labels)
    assert len(runs) == 2
    # each run is the reply (with its leading separator space) followed by the EOS token, nothing else
    assert [tok.decode(r[:-1]).strip() for r in runs] == ["左侧", "磁共振"]
    assert all(r[-1] == tok.eos_token_id for r in runs)
    # no system, user, image or BOS token is supervised
    sup = labels != IGNORE
    assert not sup[ids == layout.image_token_id].any()
    assert labels[0] == IGNORE and ids[0] == tok.bos_token_id
    assert set(np.unique(labels[sup])) <= set(np.unique(ids[sup]))
    assert (labels[sup] == ids[sup]).all()


def test_prompt_prefix_tokens_match_inference_prompt(tok_layout):
    """Training and inference tokenize the prompt identically, so the model is asked what it was trained on."""
    tok, layout = tok_layout
    msgs = two_turns()[:2]
    ids, labels = encode(msgs, V1, tok, layout)
    first_sup = int(np.flatnonzero(labels != IGNORE)[0])
    prompt = render(msgs[:1], V1, add_generation_prompt=True).text
    p_ids = tok(prompt, add_special_tokens=True)["input_ids"]
    expanded = []
    for i in p_ids:
        expanded += [i] * (layout.num_image_tokens if i == layout.image_token_id else 1)
    assert list(ids[:first_sup]) == expanded


def test_image_token_expands_to_patch_count(tok_layout):
    tok, layout = tok_layout
    ids, labels = encode(two_turns(), V1, tok, layout)
    assert (ids == layout.image_token_id).sum() == layout.num_image_tokens == (32 // 8) ** 2
    where = np.flatnonzero(ids == layout.image_token_id)
    assert (np.diff(where) == 1).all()  # one contiguous block


def test_truncation_cuts_text_after_the_image_never_image_tokens(tok_layout):
    tok, layout = tok_layout
    from qilin_lite.encoding import TokenLayout

    long = [{"role": "user", "content": "<image>\n" + "病灶位于哪一侧？" * 3}, {"role": "assistant", "content": "左侧" * 200}]
    full_ids, _ = encode(long, V1, tok, layout)
    img_end = int(np.flatnonzero(full_ids == layout.image_token_id)[-1]) + 1
    # total: every position counts
    short = TokenLayout(layout.image_token_id, layout.num_image_tokens, img_end + 30, "total")
    ids, labels = encode(long, V1, tok, short)
    assert len(ids) == img_end + 30
    assert (ids == layout.image_token_id).sum() == layout.num_image_tokens
    assert (labels != IGNORE).any()
    # text (the authors'): max_length counts text ids, the image as one, so the image's other tokens come on top
    ids_t, labels_t = encode(long, V1, tok, TokenLayout(layout.image_token_id, layout.num_image_tokens, img_end + 30))
    assert len(ids_t) == img_end + 30 + layout.num_image_tokens - 1
    assert (ids_t[: len(ids)] == ids).all() and (labels_t[: len(ids)] == labels).all()


def test_sample_whose_image_tokens_do_not_fit_is_rejected(tok_layout):
    tok, layout = tok_layout
    from qilin_lite.encoding import TokenLayout

    msgs = [{"role": "user", "content": "<image>\n问题"}, {"role": "assistant", "content": "左侧"}]
    with pytest.raises(BadRecord, match="image tokens end at position"):
        encode(msgs, V1, tok, TokenLayout(layout.image_token_id, layout.num_image_tokens, layout.num_image_tokens - 1,
                                          "total"))
    before = len(tok(V1.system + " USER: ")["input_ids"])  # text ids before the image
    with pytest.raises(BadRecord, match="an image sits at text position"):
        encode(msgs, V1, tok, TokenLayout(layout.image_token_id, layout.num_image_tokens, before - 1))


def test_sample_with_no_reply_left_after_truncation_is_rejected(tok_layout):
    tok, layout = tok_layout
    from qilin_lite.encoding import TokenLayout

    msgs = [{"role": "user", "content": "<image>\n" + "病灶位于哪一侧？" * 40}, {"role": "assistant", "content": "左侧"}]
    full_ids, _ = encode(msgs, V1, tok, layout)
    img_end = int(np.flatnonzero(full_ids == layout.image_token_id)[-1]) + 1
    with pytest.raises(BadRecord, match="no reply token is left to learn from after the cut"):
        encode(msgs, V1, tok, TokenLayout(layout.image_token_id, layout.num_image_tokens, img_end + 5, "total"))
    with pytest.raises(BadRecord, match="no reply token is left to learn from after the cut at"):
        encode(msgs, V1, tok, TokenLayout(layout.image_token_id, layout.num_image_tokens, img_end + 5 - 15))


def test_collator_pads_labels_with_ignore_and_keeps_images_in_row_order():
    a = {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([IGNORE, 5, 6]), "pixel_values": torch.zeros(1, 3, 4, 4)}
    b = {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([IGNORE, 7]), "pixel_values": None}
    c = {"input_ids": torch.tensor([1, 8, 9, 10, 11]), "labels": torch.tensor([IGNORE, IGNORE, 9, 10, 11]),
         "pixel_values": torch.ones(1, 3, 4, 4)}
    batch = Collator(pad_token_id=0)([a, b, c])
    assert batch["input_ids"].shape == (3, 5)
    assert batch["labels"][1].tolist() == [IGNORE, 7, IGNORE, IGNORE, IGNORE]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["pixel_values"].shape[0] == 2
    assert batch["pixel_values"][0].sum() == 0 and batch["pixel_values"][1].sum() > 0


def test_hf_wrapper_keeps_images_when_the_first_item_is_text_only():
    from qilin_lite.train.dataset import as_hf_dataset

    class Two:
        lengths = np.array([3, 3])

        def __len__(self):
            return 2

        def __getitem__(self, i):
            item = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([IGNORE, 2, 3])}
            if i == 1:
                item["pixel_values"] = torch.ones(1, 3, 4, 4)
            return item

    batch = as_hf_dataset(Two())[[0, 1]]
    assert batch["pixel_values"][0] is None and batch["pixel_values"][1].shape == (1, 3, 4, 4)


def test_a_batch_is_the_same_as_its_items_with_one_processor_call(tmp_path, tiny_base, tiny_data, monkeypatch):
    """`__getitems__` (what the DataLoader calls) gives each item's ids, labels and pixels exactly as `__getitem__`,
    with one image-processor call for the batch; an image that fails to decode then is recorded and its record
    replaced by the next one, as per item."""
    import shutil

    import torch
    from conftest import tiny_recipe
    from transformers import AutoConfig

    from qilin_lite.model import load_tokenizer_and_processor
    from qilin_lite.train.data import build_dataset

    images = tmp_path / "images"
    shutil.copytree(tiny_data["images"], images)
    tok, ip = load_tokenizer_and_processor(str(tiny_base))
    recipe = tiny_recipe("tune", "lora", tmp_path / "run", tiny_data["tune"], images, **{"model.base": str(tiny_base)})
    ds, _ = build_dataset(recipe, tok, ip, AutoConfig.from_pretrained(str(tiny_base)), tmp_path / "run")
    calls = []
    real = ds.images.process
    monkeypatch.setattr(ds.images, "process", lambda pil: calls.append(len(pil)) or real(pil))
    batch = ds.__getitems__([0, 3, 5, 6])
    assert calls == [4]
    for i, got in zip([0, 3, 5, 6], batch):
        want = ds[i]
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])
        assert torch.equal(got["pixel_values"], want["pixel_values"])
    # the image of record 3 goes bad after the up-front check: record 4 is served in its place, and it is recorded
    (images / ds.records[3].images[0]).write_bytes(b"not an image any more")
    batch = ds.__getitems__([0, 3, 5])
    assert torch.equal(batch[1]["input_ids"], ds[4]["input_ids"])
    assert torch.equal(batch[1]["pixel_values"], ds[4]["pixel_values"])
    import json

    rows = [json.loads(x) for x in (tmp_path / "run" / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["during"]) for r in rows] == [(ds.records[3].id, "training")]
