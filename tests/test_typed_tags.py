"""Tags typed inside each other (issue 34): text that still spells a tag once a template's single pass took the tags
out (`<<image>image>` -> `<image>`) stays text in every template, in training (encoding.py) and in chat (typed text,
prompt ids): never an image slot with no image behind it (the model fails: "Image features and image tokens do not
match"), never a crash. HuatuoGPT-Vision's own ids for these cases: tests/test_huatuo.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qilin_lite.encoding import TokenLayout, encode
from qilin_lite.families import IMAGE_TOKEN, get_template, typed_text
from qilin_lite.serve.generate import Generator

DATA = Path(__file__).parent / "data"
PATCHES = 3
NESTED = "<<image>image>是什么？"


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """A Qwen2-style BPE (tokenizer.json) and a LLaMA SentencePiece one (the authors' encoding), `<image>` added."""
    from qilin_lite.model import load_tokenizer

    qwen = tmp_path_factory.mktemp("qwen")
    for f in (DATA / "huatuo").glob("tokenizer*"):
        shutil.copy(f, qwen)
    sp = tmp_path_factory.mktemp("sp")
    shutil.copy(DATA / "fidelity" / "tokenizer.model", sp)
    (sp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    out = {}
    for name, d in (("bpe", qwen), ("sentencepiece", sp)):
        tok = load_tokenizer(str(d))
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        out[name] = tok
    assert out["sentencepiece"].slow_llama is not None and out["bpe"].slow_llama is None
    return out


def _layout(tok) -> TokenLayout:
    return TokenLayout(tok.convert_tokens_to_ids(IMAGE_TOKEN), PATCHES, 4096)


CASES = [  # (template, tokenizer)
    ("plain", "bpe"), ("plain", "sentencepiece"), ("vicuna_v1", "bpe"), ("vicuna_v1", "sentencepiece"),
    ("huatuo", "bpe"), ("chatml", "bpe"),
]


@pytest.mark.parametrize("name, kind", CASES)
@pytest.mark.parametrize("question, images", [(NESTED, 1), (f"{IMAGE_TOKEN}\n{NESTED}", 2),
                                              (f"<image<image>>{NESTED}", 2)])
def test_training_keeps_a_spelt_tag_as_text(toks, name, kind, question, images):
    template, tok = get_template(name), toks[kind]
    if images > 1 and name == "plain":
        pytest.skip("plain captions one image")
    layout = _layout(tok)
    record = [{"role": "user", "content": question}, {"role": "assistant", "content": "右肺。"}]
    assert sum(m["content"].count(IMAGE_TOKEN) for m in record) == images  # the record's own tags, as data check counts
    ids, labels = encode(record, template, tok, layout)
    slots = 1 if not template.separate_images else images
    assert (ids == layout.image_token_id).sum() == PATCHES * slots
    if template.dialog:  # plain shows the image alone, the text not at all
        text = tok.decode([i for i in ids.tolist() if i != layout.image_token_id])
        assert "image>是什么？" in text and text.count("<image>") == 1 + question.startswith("<image<")
    assert "右肺。" in tok.decode(ids[labels != -100])


@pytest.mark.parametrize("name, kind", [c for c in CASES if c[0] != "plain"])
def test_chat_keeps_a_typed_spelt_tag_as_text(toks, name, kind):
    template, tok = get_template(name), toks[kind]
    layout = _layout(tok)
    images = 2 if template.separate_images else 1  # two files: two images, or one composite
    typed = typed_text(NESTED, template)
    assert typed_text(typed, template) == typed  # asked again (regenerate): nothing more taken out
    gen = Generator(model=None, tokenizer=tok, images=None, template=template, layout=layout)
    first = [{"role": "user", "content": f"{IMAGE_TOKEN}\n" * images + typed}]
    history = [*first, {"role": "assistant", "content": "一张胸片。"},
               {"role": "user", "content": typed_text("<</s>s><<image>image>还有呢？", template)}]
    for msgs in (first, history):
        ids = gen.prompt_ids(msgs).tolist()
        assert ids.count(layout.image_token_id) == PATCHES * images
        text = tok.decode([i for i in ids if i != layout.image_token_id])
        assert "image>是什么？" in text and "\ue000" not in text
