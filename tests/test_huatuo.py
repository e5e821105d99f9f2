"""HuatuoGPT-Vision's prompt format against its authors' own code.

`data/huatuo/expected.json` was produced once by running FreedomIntelligence/HuatuoGPT-Vision's `cli.py`
(`HuatuoChatbot.input_moderation`, `insert_image_placeholder`, `get_conv_without_history` / `get_conv` with its
history, `preprocess_huatuo`, `tokenizer_image_token`) in a scratch environment with transformers 4.40.2 and
tokenizers 0.19.1, on `data/huatuo/tokenizer.json`: a small byte-level BPE with Qwen2's pre-tokenizer and special
tokens (`demo.qwen.train_qwen_tokenizer`), shipped so no third-party file is needed. Their image placeholder is the
index -200; here it is the `<image>` token's id, and each image expands to its own 576 tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qilin_lite.families import IMAGE_TOKEN, get_template, render
from qilin_lite.serve.generate import Generator
from qilin_lite.encoding import IGNORE, TokenLayout, encode

DATA = Path(__file__).parent / "data" / "huatuo"
EXPECTED = json.loads((DATA / "expected.json").read_text(encoding="utf-8"))
PATCHES = 576  # CLIP ViT-L/14-336: 24 x 24 patch tokens per image


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from qilin_lite.model import load_tokenizer

    d = tmp_path_factory.mktemp("qwen_tok")
    for f in DATA.glob("tokenizer*"):
        shutil.copy(f, d)
    t = load_tokenizer(str(d))
    t.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})  # as convert / base add it
    return t


def _theirs_expanded(ids: list[int], image_id: int, images: int | None = None, text_image=()) -> list[int]:
    """Their ids with each image slot expanded; past the first `images` slots (where their prompt is invalid: a
    tag their moderation left spelt, which they split into a slot with no image), that tag as the text it is."""
    out, slots = [], 0
    for i in ids:
        if i == EXPECTED["image_token_index"]:
            slots += 1
            out.extend([image_id] * PATCHES if images is None or slots <= images else text_image)
        else:
            out.append(i)
    return out


def _conversation(case) -> list[dict]:
    """The messages chat builds: the images in front of the question they came with, answers in between."""
    msgs = []
    for k, turn in enumerate(case["turns"]):
        msgs.append({"role": "user", "content": f"{IMAGE_TOKEN}\n" * turn["images"] + turn["question"]})
        if k < len(case["answers"]):
            msgs.append({"role": "assistant", "content": case["answers"][k]})
    return msgs


@pytest.mark.parametrize("case", EXPECTED["cases"], ids=[c["name"] for c in EXPECTED["cases"]])
def test_prompt_ids_equal_their_cli(case, tok):
    from qilin_lite.families import typed_text

    template = get_template("huatuo")
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    gen = Generator(model=None, tokenizer=tok, images=None, template=template,
                    layout=TokenLayout(image_id, PATCHES, 10**9))
    msgs = _conversation(case)
    for m in msgs:  # what a person typed goes through the same moderation chat applies
        if m["role"] == "user":
            n = m["content"].count(f"{IMAGE_TOKEN}\n")
            m["content"] = f"{IMAGE_TOKEN}\n" * n + typed_text(m["content"].replace(f"{IMAGE_TOKEN}\n", "", n),
                                                               template)
    ours = gen.prompt_ids(msgs).tolist()
    images = sum(t["images"] for t in case["turns"])
    if "text_image" in case:  # cli.py's prompt has a slot more than images: there, the text it spells
        assert case["ids"].count(EXPECTED["image_token_index"]) > images
        assert ours == _theirs_expanded(case["ids"], image_id, images, case["text_image"])
    else:
        assert ours == _theirs_expanded(case["ids"], image_id)
    assert ours.count(image_id) == PATCHES * images


def test_training_sees_chats_prompt_before_every_reply(tok):
    """Training encodes the same pieces; `{answer} \\n` of each round is learned and the end token after the last
    one. The ids before every reply are exactly what chat (cli.py) sends for that turn, history included: cli.py's
    history has no end token after earlier replies, so training puts none there (before, it did, and a run trained
    here saw in chat a second-turn prefix it never saw in training)."""
    template = get_template("huatuo")
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    layout = TokenLayout(image_id, PATCHES, 4096)
    case = next(c for c in EXPECTED["cases"] if c["name"] == "second turn")
    msgs = _conversation(case) + [{"role": "assistant", "content": "位于肝右叶。"}]
    ids, labels = encode(msgs, template, tok, layout)
    assert (ids == image_id).sum() == 3 * PATCHES
    assert (labels[ids == image_id] == IGNORE).all()
    supervised = tok.decode(ids[labels != IGNORE])
    assert supervised == "右下肺野可见片状高密度影，考虑肺炎。 \n位于肝右叶。 \n<|endoftext|>"
    gen = Generator(model=None, tokenizer=tok, images=None, template=template, layout=layout)
    for turn in (1, 3):  # the first question, then the second with the first round as history
        prompt = gen.prompt_ids(msgs[:turn])
        assert ids[: len(prompt)].tolist() == prompt.tolist(), turn
        assert labels[len(prompt) - 1] == IGNORE and labels[len(prompt)] != IGNORE
    # the second-turn prompt is cli.py's own (expected.json), images expanded
    assert gen.prompt_ids(msgs[:3]).tolist() == _theirs_expanded(case["ids"], image_id)


def test_template_facts():
    t = get_template("huatuo")
    assert (t.multi_image, t.max_images) == ("separate", 6)  # cli.py: max_image_num 6, each image its own tokens
    assert dict(t.generation) == {"repetition_penalty": 1.2, "min_new_tokens": 1}
    r = render([{"role": "system", "content": "ignored"}, {"role": "user", "content": "q"}], t,
               add_generation_prompt=True)
    assert r.text == "<|user|>\nq\n<|assistant|>\n"
    assert np.all(np.diff(r.breaks) > 0)


@pytest.mark.parametrize("name", ["huatuo", "chatml"])
def test_saved_chat_template_renders_what_chat_sends(name, tok):
    """The Jinja template saved with a run (servers, apply_chat_template users) gives chat's prompt text, for string
    and for list-of-parts contents, several images and a second turn."""
    template = get_template(name)
    from qilin_lite.families import chat_template_jinja, place_image

    tok.chat_template = chat_template_jinja(template)

    msgs = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n 两张图有何不同？ "},
            {"role": "assistant", "content": "第二张图可见积液。"},
            {"role": "user", "content": "积液多吗？"}]
    want = render(place_image(msgs, template), template, add_generation_prompt=True).text
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": " 两张图有何不同？ "}]},
             {"role": "assistant", "content": [{"type": "text", "text": "第二张图可见积液。"}]},
             {"role": "user", "content": [{"type": "text", "text": "积液多吗？"}]}]
    assert tok.apply_chat_template(parts, tokenize=False, add_generation_prompt=True) == want
    if name == "huatuo":  # typed tags in a text part are deleted, as cli.py's input_moderation deletes them
        typed = [{**parts[0], "content": [*parts[0]["content"][:2], {"type": "text", "text": " 两张<image>图有何</s>不同？<s> "}]},
                 *parts[1:]]
        assert tok.apply_chat_template(typed, tokenize=False, add_generation_prompt=True) == want
