"""Qwen2.5-VL (family `qwen2.5-vl`, template `qwen2-vl`): training's ids and labels, and chat's prompt ids, against
the model's own code on varied records.

Ground truth:
- ids: the model's processor class (`Qwen2_5_VLProcessor`) rendering the released chat template
  (tests/data/qwen_vl/chat_template.jinja) with `apply_chat_template(tokenize=True)` over the images, messages built
  as QwenLM's `qwen-vl-finetune` builds them (`_build_messages`: each `<image>` an image part where it stands, the
  text pieces between stripped);
- labels: `qwen-vl-finetune`'s rule, restated here from their `preprocess_qwen_visual`: from two tokens after each
  `assistant` token to one past the next `<|im_end|>`.
The processor class cannot be constructed without torchvision (its video processor imports it); without it the
test builds the instance without `__init__` and gives it the tokenizer and the PIL image processor: its own
`__call__` / `apply_chat_template` (the expansion of `<|image_pad|>`) run unchanged.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qilin_lite.encoding import encode, prompt_ids
from qilin_lite.families import IGNORE, get_template, guess_template
from qilin_lite.images.pixel_values import NativeImageLoader
from qilin_lite.model import load_tokenizer_and_processor, token_layout

OFFICIAL = (Path(__file__).parent / "data" / "qwen_vl" / "chat_template.jinja").read_text(encoding="utf-8")
TEXTS = ["胸部X光片显示双肺纹理清晰，未见明显异常。", "这张CT图像中病灶位于哪里？", "左肺上叶可见结节影。",
         "What does this MRI show?", "The lesion is in the right lobe.", "请描述图像。", "心影大小正常。"]


@pytest.fixture(scope="module")
def qwen_vl_dir(tmp_path_factory):
    from qilin_lite.demo.qwen_vl import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_vl"), TEXTS * 30)


@pytest.fixture(scope="module")
def parts(qwen_vl_dir):
    from transformers import AutoConfig

    tok, ip = load_tokenizer_and_processor(str(qwen_vl_dir))
    config = AutoConfig.from_pretrained(str(qwen_vl_dir))
    return tok, ip, config


def official_processor(tok, ip):
    from transformers import Qwen2_5_VLProcessor

    try:
        return Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, chat_template=OFFICIAL)
    except Exception:  # noqa: BLE001 - no torchvision: the same class, its __init__ skipped (module docstring)
        p = object.__new__(Qwen2_5_VLProcessor)
        p.tokenizer, p.image_processor, p.video_processor, p.chat_template = tok, ip, None, OFFICIAL
        p.image_token, p.video_token = "<|image_pad|>", "<|video_pad|>"
        p.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
        p.video_token_id = tok.convert_tokens_to_ids("<|video_pad|>")
        return p


def their_messages(messages: list[dict], images: list) -> list[dict]:
    """qwen-vl-finetune's message building, restated: user text split at `<image>`, pieces stripped, empty ones
    dropped; assistant text one text part."""
    pool, out = list(images), []
    for m in messages:
        if m["role"] == "user":
            content = []
            for seg in re.split(r"(<image>)", m["content"]):
                if seg == "<image>":
                    content.append({"type": "image", "image": pool.pop(0)})
                elif seg.strip():
                    content.append({"type": "text", "text": seg.strip()})
            out.append({"role": "user", "content": content})
        else:
            out.append({"role": m["role"], "content": [{"type": "text", "text": m["content"]}]})
    assert not pool
    return out


def their_labels(ids: list[int], tok) -> list[int]:
    assistant, im_end = tok.convert_tokens_to_ids("assistant"), tok.convert_tokens_to_ids("<|im_end|>")
    labels = [IGNORE] * len(ids)
    pos = 0
    while pos < len(ids):
        if ids[pos] == assistant:
            start = end = pos + 2
            while end < len(ids) and ids[end] != im_end:
                end += 1
            if end < len(ids):
                labels[start:end + 2] = ids[start:end + 2]
                pos = end
        pos += 1
    return labels


def random_record(rng: random.Random, n_images: int, turns: int) -> tuple[list[dict], list]:
    images = [Image.new("RGB", (rng.randint(40, 230), rng.randint(40, 230)), tuple(rng.randrange(256) for _ in "rgb"))
              for _ in range(n_images)]
    msgs, left = [], n_images
    for t in range(turns):
        k = left if t == turns - 1 else rng.randint(0, left)
        left -= k
        q = rng.choice(TEXTS)
        where = rng.choice(["front", "back", "middle"])
        tags = "".join("<image>" + rng.choice(["\n", "", " "]) for _ in range(k))
        q = tags + q if where == "front" else (q + tags if where == "back" else q[:3] + tags + q[3:])
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": rng.choice(TEXTS)}]
    if rng.random() < 0.3:
        msgs = [{"role": "system", "content": "你是一名放射科医生。"}] + msgs
    return msgs, images


def test_the_tiny_release_is_recognised(qwen_vl_dir, parts):
    tok, ip, config = parts
    assert guess_template(str(qwen_vl_dir)) == "qwen2-vl"
    assert tok.convert_tokens_to_ids("assistant") != tok.unk_token_id  # one token, as in Qwen's vocabulary
    assert len(tok("assistant", add_special_tokens=False)["input_ids"]) == 1
    assert type(ip).__name__.endswith("Pil")


def test_ids_and_labels_equal_the_processor_and_qwen_vl_finetune(parts):
    tok, ip, config = parts
    proc = official_processor(tok, ip)
    template = get_template("qwen2-vl")
    layout = token_layout(config, max_length=100_000, length_mode="total")
    loader = NativeImageLoader(ip)
    rng = random.Random(0)
    checked = 0
    for case in range(40):
        msgs, images = random_record(rng, n_images=rng.randint(0, 6), turns=rng.randint(1, 3))
        theirs = proc.apply_chat_template(their_messages(msgs, images), tokenize=True, return_dict=True)
        want = list(theirs["input_ids"][0] if isinstance(theirs["input_ids"][0], list) else theirs["input_ids"])
        ids, labels = encode(msgs, template, tok, layout, loader.counts(images))
        assert ids.tolist() == want, case
        assert labels.tolist() == their_labels(want, tok), case
        if images:
            ours = loader.inputs(images)
            assert torch.equal(ours["image_grid_thw"], torch.as_tensor(theirs["image_grid_thw"]))
            assert np.allclose(ours["pixel_values"].numpy(), np.asarray(theirs["pixel_values"]))
        checked += len(images)
    assert checked > 40  # many images of many sizes went through


def test_chat_prompt_equals_the_processor_with_a_generation_prompt(parts):
    tok, ip, config = parts
    proc = official_processor(tok, ip)
    template = get_template("qwen2-vl")
    layout = token_layout(config, max_length=100_000)
    loader = NativeImageLoader(ip)
    rng = random.Random(1)
    for case in range(15):
        msgs, images = random_record(rng, n_images=rng.randint(1, 4), turns=rng.randint(1, 3))
        history = msgs[:-1]  # ends with the user turn being answered
        theirs = proc.apply_chat_template(their_messages(history, images), tokenize=True, return_dict=True,
                                          add_generation_prompt=True)
        want = list(theirs["input_ids"][0] if isinstance(theirs["input_ids"][0], list) else theirs["input_ids"])
        assert prompt_ids(history, template, tok, layout, loader.counts(images)).tolist() == want, case


def test_typed_vision_tokens_are_text_never_an_image_slot(parts):
    tok, ip, config = parts
    template = get_template("qwen2-vl")
    layout = token_layout(config, max_length=100_000)
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    starts = tok.convert_tokens_to_ids("<|vision_start|>")
    msgs = [{"role": "user", "content": "<image>\n这是<|vision_start|><|image_pad|><|vision_end|>什么？"},
            {"role": "assistant", "content": "<|image_pad|>结节"}]
    ids, labels = encode(msgs, template, tok, layout, [4])
    assert ids.tolist().count(pad) == 4  # the real image's four tokens only
    assert ids.tolist().count(starts) == 1
    assert "<|vision_start|><|image_pad|><|vision_end|>什么" in tok.decode(ids[ids != pad])


def test_saved_chat_template_renders_what_training_renders(parts):
    """The template saved with a run renders records' string content (with `<image>` tags) and list-of-parts
    content to the text training tokenizes, so servers that render it prompt as training did."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tok, ip, config = parts
    template = get_template("qwen2-vl")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders them
    ours = env.from_string(template.chat_template_jinja())
    official = env.from_string(OFFICIAL)
    rng = random.Random(2)
    for _ in range(20):
        msgs, images = random_record(rng, n_images=rng.randint(0, 3), turns=rng.randint(1, 3))
        r = template.render(template.place_images(msgs))
        listed = their_messages(msgs, images)
        assert ours.render(messages=msgs) == r.text
        assert ours.render(messages=listed) == r.text == official.render(messages=listed)
        gen = template.render(template.place_images(msgs[:-1]), add_generation_prompt=True).text
        assert ours.render(messages=msgs[:-1], add_generation_prompt=True) == gen


# --- training, on the real stage code ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vl_data(tmp_path_factory):
    """Eight records, one image each at sizes from 40 to 230 px (4 to 64 image tokens), Chinese questions."""
    import json

    root = tmp_path_factory.mktemp("vl_data")
    (root / "img").mkdir()
    rng, rows = random.Random(3), []
    for i in range(8):
        size = (rng.randint(40, 230), rng.randint(40, 230))
        Image.new("RGB", size, (30 * i, 200 - 20 * i, 90)).save(root / "img" / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(TEXTS)}, {"from": "gpt", "value": rng.choice(TEXTS)}]})
    (root / "train.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return root


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if k in after and not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def vl_align(tmp_path_factory, qwen_vl_dir, vl_data):
    from conftest import tiny_recipe

    from qilin_lite.train.stage import train_stage

    out = tmp_path_factory.mktemp("vl_runs") / "align"
    r = tiny_recipe("align", "align", out, vl_data / "train.json", vl_data / "img", **{"model.base": str(qwen_vl_dir)})
    return train_stage(r)


def test_align_trains_the_merger_only(qwen_vl_dir, vl_align):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qilin_lite.model import RunInfo

    out, model = vl_align
    base = _state(Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_vl_dir), dtype=torch.float32))
    changed = _changed(base, _state(model))
    assert changed and all(k.startswith("model.visual.merger.") for k in changed), changed
    info = RunInfo.load(out)
    assert (info.kind, info.template, info.image_mode) == ("align", "qwen2-vl", "native")
    from safetensors.torch import load_file

    saved = load_file(str(out / "projector.safetensors"))
    assert {f"model.visual.merger.{k}" for k in saved} == {k for k in base if k.startswith("model.visual.merger.")}


@pytest.mark.parametrize("mode", ["qlora", "full"])
def test_tune_from_the_align_run_trains_what_the_mode_says(tmp_path, qwen_vl_dir, vl_data, vl_align, mode):
    from conftest import tiny_recipe

    from qilin_lite.train.stage import train_stage

    align_out, aligned = vl_align
    start = _state(aligned)  # the tuned run starts from these: the base plus the aligned merger
    r = tiny_recipe("tune", mode, tmp_path / mode, vl_data / "train.json", vl_data / "img",
                    **{"model.from_run": str(align_out)})
    out, model = train_stage(r)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    if mode == "qlora":
        assert all("lora_" in n or ".merger.modules_to_save." in n for n in trainable), trainable
        assert any("language_model" in n and "lora_B" in n for n in trainable)
        assert (out / "adapter_model.safetensors").is_file()
    else:
        assert any(n.startswith("model.language_model.") for n in trainable)
        assert not any(n.startswith("model.visual.") and ".merger." not in n for n in trainable)
    assert not any(".visual.blocks." in n or ".patch_embed." in n for n in trainable)  # the tower stays frozen
    after = {n: p.detach().float() for n, p in model.named_parameters()}
    if mode == "qlora":  # B starts at zero and the merger copy at the aligned one: both moved
        assert any("lora_B" in n and after[n].abs().sum() > 0 for n in trainable)
        merger = {n: after[n] for n in trainable if ".merger.modules_to_save." in n}
        assert merger and any(not torch.equal(v, start[n.replace("base_model.model.", "").replace(
            ".modules_to_save.default", "")]) for n, v in merger.items())
    else:
        assert _changed(start, {n: after[n] for n in trainable}) & {n for n in trainable if "language_model" in n}
    assert all(torch.isfinite(after[n]).all() for n in trainable)


def test_chat_answers_with_the_trained_prompt(tmp_path, qwen_vl_dir, vl_data, vl_align):
    """chat's generator on the align run: prompt ids are the processor's for the same question and image, and an
    answer comes back (several images, one per question)."""
    from qilin_lite.serve.generate import load_generator

    out, _ = vl_align
    gen, info = load_generator(str(out), dtype="float32", max_new_tokens=4, temperature=0)
    assert info.image_mode == "native"
    tok, ip = load_tokenizer_and_processor(str(out))
    img = [vl_data / "img" / "0.png", vl_data / "img" / "5.png"]
    history = [{"role": "user", "content": "<image>\n<image>\n病灶位于哪里？"}]
    answer = gen.generate([history], [img])[0]
    assert isinstance(answer, str)
    proc = official_processor(tok, ip)
    pil = [Image.open(p).convert("RGB") for p in img]
    theirs = proc.apply_chat_template(their_messages(history, pil), tokenize=True, return_dict=True,
                                      add_generation_prompt=True)
    want = list(theirs["input_ids"][0] if isinstance(theirs["input_ids"][0], list) else theirs["input_ids"])
    assert gen.last_prompt_ids == want


def test_lengths_before_training_are_the_true_token_counts(parts, vl_data):
    """Every record's length as training computes it up front (length checks, grouping, packing) is the length of
    the ids it trains on, image tokens by each image's size."""
    from qilin_lite.data.records import read_records
    from qilin_lite.encoding import sample_lengths
    from qilin_lite.images.pixel_values import record_counts

    tok, ip, config = parts
    loader = NativeImageLoader(ip)
    records = read_records(vl_data / "train.json", vl_data / "img")
    template = get_template("qwen2-vl")
    layout = token_layout(config, max_length=4096, length_mode="total")
    lengths, bad = sample_lengths(records, template, tok, layout, counts_of=record_counts(loader))
    assert not bad
    for rec, n in zip(records, lengths):
        pil = [loader.raw(r) for r in rec.images]
        assert n == len(encode(rec.messages, template, tok, layout, loader.counts(pil))[0])
    assert len(set(lengths.tolist())) > 3  # the sizes differ, so do the lengths


def test_a_training_batch_is_what_the_processor_gives_the_model(qwen_vl_dir, parts):
    """The collated batch (ids, image-token marks, patches, grids) gives the model the logits the processor's own
    outputs give it: Qwen2.5-VL's 3-D positions come from the marked image tokens (without the marks it silently
    falls back to 1-D positions), and two records of different sizes pad without changing either."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qilin_lite.train.collator import Collator

    tok, ip, config = parts
    proc = official_processor(tok, ip)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_vl_dir), dtype=torch.float32).eval()
    template = get_template("qwen2-vl")
    layout = token_layout(config, max_length=100_000, length_mode="total")
    loader = NativeImageLoader(ip)
    rng = random.Random(4)
    samples, theirs = [], []
    for n in (2, 1):
        msgs, images = random_record(rng, n_images=n, turns=2)
        ids, labels = encode(msgs, template, tok, layout, loader.counts(images))
        samples.append({"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                        "mm_token_type_ids": torch.from_numpy((ids == config.image_token_id).astype(np.int64)),
                        **loader.inputs(images)})
        theirs.append(proc.apply_chat_template(their_messages(msgs, images), tokenize=True, return_dict=True,
                                               return_tensors="pt"))
    batch = Collator(tok.pad_token_id)(samples)
    assert batch["mm_token_type_ids"].sum() == (batch["input_ids"] == config.image_token_id).sum()
    with torch.no_grad():
        ours = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for k, t in enumerate(theirs):
            want = model(**{k2: torch.as_tensor(v) for k2, v in t.items()}).logits[0]
            assert torch.equal(torch.as_tensor(t["mm_token_type_ids"][0]), samples[k]["mm_token_type_ids"])
            assert torch.allclose(ours[k, :want.shape[0]], want, atol=1e-5)
        unmarked = model(**{k: v for k, v in batch.items() if k not in ("labels", "mm_token_type_ids")}).logits
    assert not torch.allclose(unmarked, ours, atol=1e-4)  # the marks matter: the test would see them missing


def test_data_check_and_inspect_count_each_images_tokens(qwen_vl_dir, vl_data, tmp_path):
    """`data check --model` finds a record too long only by its images' true counts, and `data inspect` shows each
    image with its own count."""
    import io
    import json

    from qilin_lite.data.check import check_data
    from qilin_lite.data.inspect import inspect_records

    big = tmp_path / "big.png"
    Image.new("RGB", (224, 224), (9, 9, 9)).save(big)  # 64 tokens at the tiny processor's max_pixels
    rows = [{"id": "big", "image": str(big), "conversations": [
        {"from": "human", "value": "<image>\n请描述图像。"}, {"from": "gpt", "value": "心影大小正常。"}]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    tok, ip = load_tokenizer_and_processor(str(qwen_vl_dir))
    from transformers import AutoConfig

    layout = token_layout(AutoConfig.from_pretrained(str(qwen_vl_dir)), 10**6, "total")
    msgs = [{"role": "user", "content": "<image>\n请描述图像。"}, {"role": "assistant", "content": "心影大小正常。"}]
    full = len(encode(msgs, get_template("qwen2-vl"), tok, layout, [64])[0])
    for max_length, too_long in ((full - 1, 1), (full, None)):  # one token over, and exactly at the bound
        result = check_data(path, tmp_path, model=qwen_vl_dir, max_length=max_length, template="qwen2-vl",
                            length_mode="total", allow_outside_images=True)
        assert result.counts.get("too long") == too_long, (max_length, result.counts)
    result = check_data(path, tmp_path, model=qwen_vl_dir, max_length=full - 1, template="qwen2-vl",
                        length_mode="total", allow_outside_images=True)
    assert "64 of them image tokens" in result.examples["too long"][0]
    out = io.StringIO()
    inspect_records(vl_data / "train.json", str(qwen_vl_dir), image_folder=vl_data / "img", template="qwen2-vl",
                    n=2, color=False, out=out)
    assert re.search(r"<\|vision_start\|> <image ×\d+> <\|vision_end\|>", out.getvalue()), out.getvalue()[:500]


@pytest.fixture(scope="module")
def vl_lora(tmp_path_factory, vl_data, vl_align):
    from conftest import tiny_recipe

    from qilin_lite.train.stage import train_stage

    out = tmp_path_factory.mktemp("vl_runs") / "lora"
    r = tiny_recipe("tune", "lora", out, vl_data / "train.json", vl_data / "img",
                    **{"model.from_run": str(vl_align[0]), "train.max_steps": 4})
    return train_stage(r)


def test_merge_gives_a_plain_qwen2_5_vl_directory_with_the_same_answers(tmp_path, vl_data, vl_lora):
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qilin_lite.merge import merge_run
    from qilin_lite.model import RunInfo
    from qilin_lite.serve.generate import load_generator

    run, _ = vl_lora
    merged = merge_run(run, tmp_path / "merged", dtype="float32")
    info = RunInfo.load(merged)
    assert (info.kind, info.template, info.image_mode) == ("merged", "qwen2-vl", "native")
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(merged), dtype=torch.float32)
    assert not any("lora" in k or "modules_to_save" in k for k in plain.state_dict())
    tuned, _ = load_generator(str(run), dtype="float32", max_new_tokens=6, temperature=0)
    assert isinstance(tuned.model, PeftModel)
    folded, _ = load_generator(str(merged), dtype="float32", max_new_tokens=6, temperature=0)
    question = [[{"role": "user", "content": "<image>\n病灶位于哪里？"}]]
    image = [[vl_data / "img" / "2.png"]]
    assert folded.generate(question, image) == tuned.generate(question, image)
    assert folded.last_prompt_ids == tuned.last_prompt_ids
    tok, _ = load_tokenizer_and_processor(str(merged))
    assert "<|vision_start|>" in tok.chat_template  # the saved template servers render


def test_eval_answers_every_item_with_the_tuned_run(tmp_path, vl_data, vl_lora):
    from qilin_lite.eval import load_eval_items, model_generate, run_eval

    items = load_eval_items(vl_data / "train.json", "llava", vl_data / "img")
    generate = model_generate(vl_lora[0], batch_size=3, max_new_tokens=4, dtype="float32")
    metrics = run_eval(items, generate, tmp_path / "eval", batch_size=3)
    lines = (tmp_path / "eval" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(items) == 8 and metrics


def test_a_crashed_run_resumes_to_the_same_weights(tmp_path, vl_data, vl_align):
    """A lora run that dies in its second epoch (after its step-3 checkpoint) and resumes ends bit for bit where the
    uninterrupted run ends: the image grids, patches and image-token marks of every batch come back the same."""
    from conftest import CRASH_RESUME, crash_and_resume, tiny_recipe

    def recipe(out):
        return tiny_recipe("tune", "lora", out, vl_data / "train.json", vl_data / "img",
                           **{**CRASH_RESUME, "model.from_run": str(vl_align[0])})

    want, got = crash_and_resume(tmp_path, recipe)
    assert want.keys() == got.keys() and any("merger" in k for k in want)
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_pixel_bounds_of_the_recipe_train_and_are_saved_with_the_run(tmp_path, qwen_vl_dir, vl_data, tiny_base,
                                                                     tiny_data):
    """data.max_pixels bounds every image's tokens in training, and the run's saved processor keeps the bound, so
    chat and eval resize as training did; on a LLaVA model (one fixed size) the setting is one line."""
    import json

    from conftest import tiny_recipe

    from qilin_lite.errors import UserError
    from qilin_lite.train.stage import train_stage

    bound = 28 * 28 * 16
    r = tiny_recipe("align", "align", tmp_path / "a", vl_data / "train.json", vl_data / "img",
                    **{"model.base": str(qwen_vl_dir), "data.max_pixels": bound})
    out, _ = train_stage(r)
    saved = json.loads((out / "preprocessor_config.json").read_text(encoding="utf-8"))
    assert saved["size"]["longest_edge"] == bound
    tok, ip = load_tokenizer_and_processor(str(out))
    assert NativeImageLoader(ip).tokens(224, 224) == 16  # 64 at the base's own bound
    lengths = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    assert lengths  # the run finished and described itself
    with pytest.raises(UserError, match="data.min_pixels / data.max_pixels"):
        train_stage(tiny_recipe("align", "align", tmp_path / "b", tiny_data["align"], tiny_data["images"],
                                **{"model.base": str(tiny_base), "data.max_pixels": bound}))


def test_the_command_line_tunes_a_released_model_directory(tmp_path, qwen_vl_dir, vl_data, monkeypatch, capsys):
    """`qilin-lite tune --lora --from DIR` with DIR a Qwen2.5-VL release (no qilin.json), as users pass
    `--from lingshu-medical-mllm/Lingshu-7B`; its template settles to the model's own, and `plan --from DIR` sizes
    the model in its own class (every parameter counted), an image's tokens as its processor counts them."""
    from conftest import run_cli_captured

    from qilin_lite.config import REPO_RECIPES
    from qilin_lite.errors import UserError
    from qilin_lite.model import RunInfo
    from qilin_lite.plan.cli import plan_recipe

    out = tmp_path / "run"
    code, stdout, stderr = run_cli_captured(
        monkeypatch, capsys, "tune", "--lora", "--from", qwen_vl_dir, "--data", vl_data / "train.json",
        "--image-folder", vl_data / "img", "--out", out, "--set", "train.max_steps=1", "--set", "model.dtype=float32",
        "--set", "train.bf16=false", "--set", "train.global_batch=2", "--set", "train.per_device_batch=2",
        "--set", "data.num_workers=0", "--set", "train.lora_r=4")
    assert code == 0, stderr[-2000:]
    assert "tune done" in stdout
    info = RunInfo.load(out)
    assert (info.kind, info.template, info.image_mode) == ("lora", "qwen2-vl", "native")
    with pytest.raises(UserError, match="say which with --from"):
        plan_recipe(REPO_RECIPES / "lingshu-7b" / "tune-qlora.yaml")
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qilin_lite.model import load_tokenizer_and_processor
    from qilin_lite.images.pixel_values import NativeImageLoader

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_vl_dir)
    _, processor = load_tokenizer_and_processor(str(qwen_vl_dir))
    loader = NativeImageLoader(processor)  # the directory's own bounds: the recipe's would be Lingshu's
    for w, h in ((40, 40), (230, 97), (1024, 1024)):
        plan = plan_recipe(REPO_RECIPES / "lingshu-7b" / "tune-qlora.yaml", ["data.min_pixels=null", "data.max_pixels=null"],
                           source=str(qwen_vl_dir), image_size=f"{w}x{h}", device="cpu")
        assert plan.shape.total == sum(p.numel() for p in model.parameters())
        assert plan.shape.image_tokens == loader.tokens(w, h), (w, h)


def test_the_web_page_sends_chats_prompt_with_each_image_at_its_own_size(tmp_path, vl_data, vl_lora):
    """The web page's app (what its HTTP layer calls) on the tuned run: two uploads of different sizes and a DICOM
    (windowed as the LLaVA path windows it) reach the model each at its own size, with the prompt ids chat sends."""
    from conftest import web_sends_chats_prompt
    from test_chat import write_dicom

    run, _ = vl_lora
    paths = [vl_data / "img" / "1.png", vl_data / "img" / "4.png", write_dicom(tmp_path / "ct.dcm")]
    sent, gen = web_sends_chats_prompt(run, [paths[:2], paths[2:]])
    for served, shown in zip(sent, [paths[:2], paths[2:]]):
        sizes = [NativeImageLoader(gen.images.processor).raw(p).size for p in shown]
        assert served.count(gen.layout.image_token_id) == sum(gen.images.tokens(*s) for s in sizes)


def test_tune_scores_a_benchmark_while_training_as_eval_does(tmp_path, vl_data, vl_align):
    """--eval-task in the family's own class: the model in training answers at native resolution in its template,
    and the score logged at the last step is what `eval` gives the finished run."""
    import json

    from conftest import tiny_recipe

    from qilin_lite.eval.run import run_benchmark
    from qilin_lite.train.stage import run_stage

    r = tiny_recipe("tune", "lora", tmp_path / "tune", vl_data / "train.json", vl_data / "img",
                    **{"model.from_run": str(vl_align[0]), "train.max_steps": 4, "train.eval_every": 2,
                       "data.eval_task": str(vl_data / "train.json")})
    out = run_stage(r)
    history = json.loads((out / "eval_history.json").read_text(encoding="utf-8"))
    assert [(h["step"], h["metric"], h["n"]) for h in history] == [(2, "open_recall", 8), (4, "open_recall", 8)]
    scored = run_benchmark(vl_data / "train.json", "llava", tmp_path / "eval", model=str(out),
                           image_folder=vl_data / "img", dtype="float32", attn="sdpa")
    assert scored["groups"]["all"]["open_recall"] == history[-1]["value"]
