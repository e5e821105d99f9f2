"""Gemma 3 / MedGemma (family `gemma3`): training's ids and labels, and chat's prompt ids, against the model's own
code on varied records, then align -> tune on the real stage code.

Ground truth:
- ids: `Gemma3Processor.apply_chat_template(tokenize=True)` over the released chat template
  (tests/data/gemma3/chat_template.jinja) and the images (it builds without torchvision);
- labels: Google-Health's MedGemma notebook's collator rule, restated: every id but padding, `<start_of_image>` and
  the soft tokens.
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
from qilin_lite.model import load_tokenizer_and_processor, token_layout

OFFICIAL = (Path(__file__).parent / "data" / "gemma3" / "chat_template.jinja").read_text(encoding="utf-8")
TEXTS = ["胸部X光片显示双肺纹理清晰，未见明显异常。", "这张CT图像中病灶位于哪里？", "左肺上叶可见结节影。",
         "What does this MRI show?", "The lesion is in the right lobe.", "请描述图像。", "心影大小正常。"]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    from qilin_lite.demo.gemma3 import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3"), TEXTS * 30)


@pytest.fixture(scope="module")
def parts(gemma_dir):
    from transformers import AutoConfig

    tok, ip = load_tokenizer_and_processor(str(gemma_dir))
    return tok, ip, AutoConfig.from_pretrained(str(gemma_dir))


def official_processor(tok, ip, config):
    from transformers import Gemma3Processor

    return Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=OFFICIAL,
                           image_seq_length=config.mm_tokens_per_image)


def their_messages(messages: list[dict], images: list) -> list[dict]:
    """Messages as the notebook and the processor take them: list-of-parts content, an image part where each
    `<image>` stands."""
    pool, out = list(images), []
    for m in messages:
        if m["role"] == "system":
            out.append(m)
            continue
        content = []
        for seg in re.split(r"(<image>)", m["content"]):
            if seg == "<image>":
                content.append({"type": "image", "image": pool.pop(0)})
            elif seg.strip():
                content.append({"type": "text", "text": seg})
        out.append({"role": m["role"], "content": content})
    assert not pool
    return out


def their_labels(ids: list[int], tok) -> list[int]:
    masked = {tok.pad_token_id, tok.convert_tokens_to_ids("<start_of_image>"), tok.convert_tokens_to_ids("<image_soft_token>")}
    return [IGNORE if i in masked else i for i in ids]


def random_record(rng: random.Random, n_images: int, turns: int):
    images = [Image.new("RGB", (rng.randint(20, 90), rng.randint(20, 90)), tuple(rng.randrange(256) for _ in "rgb"))
              for _ in range(n_images)]
    msgs, left = [], n_images
    for t in range(turns):
        k = left if t == turns - 1 else rng.randint(0, left)
        left -= k
        q = rng.choice(TEXTS)
        tags = "".join("<image>" + rng.choice(["\n", "", " "]) for _ in range(k))
        q = rng.choice([tags + q, q + tags, q[:3] + tags + q[3:], " " + tags + q + " \n"])
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": rng.choice(TEXTS) + rng.choice(["", " "])}]
    if rng.random() < 0.3:
        msgs = [{"role": "system", "content": "你是一名放射科医生。"}] + msgs
    return msgs, images


def _ids(out) -> list[int]:
    ids = out["input_ids"]
    return list(ids[0] if isinstance(ids[0], list) else ids)


def test_recognised_and_tokenizer_as_gemma_ships_it(gemma_dir, parts):
    tok, ip, config = parts
    assert guess_template(str(gemma_dir)) == "gemma3"
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert tok("肺")["input_ids"][0] == tok.bos_token_id  # BOS added, as Gemma's tokenizer adds it
    assert token_layout(config, 100).num_image_tokens == config.mm_tokens_per_image


def test_ids_and_labels_equal_the_processor_and_the_medgemma_notebook(parts):
    tok, ip, config = parts
    proc = official_processor(tok, ip, config)
    template = get_template("gemma3")
    layout = token_layout(config, max_length=100_000, length_mode="total")
    rng = random.Random(0)
    images_seen = 0
    for case in range(40):
        msgs, images = random_record(rng, n_images=rng.randint(0, 6), turns=rng.randint(1, 3))
        theirs = proc.apply_chat_template(their_messages(msgs, images), tokenize=True, return_dict=True)
        want = _ids(theirs)
        ids, labels = encode(msgs, template, tok, layout)
        assert ids.tolist() == want, case
        assert labels.tolist() == their_labels(want, tok), case
        marks = theirs["token_type_ids"]  # what the model's bidirectional image attention reads; batches carry it
        marks = list(marks[0] if isinstance(marks[0], list) else marks)
        assert marks == (ids == config.image_token_id).astype(int).tolist()
        images_seen += len(images)
    assert images_seen > 40


def test_chat_prompt_equals_the_processor_with_a_generation_prompt(parts):
    tok, ip, config = parts
    proc = official_processor(tok, ip, config)
    template = get_template("gemma3")
    layout = token_layout(config, max_length=100_000)
    rng = random.Random(1)
    for case in range(15):
        msgs, images = random_record(rng, n_images=rng.randint(1, 4), turns=rng.randint(1, 3))
        history = msgs[:-1]
        theirs = proc.apply_chat_template(their_messages(history, images), tokenize=True, return_dict=True,
                                          add_generation_prompt=True)
        assert prompt_ids(history, template, tok, layout).tolist() == _ids(theirs), case


def test_typed_image_tokens_are_text_never_an_image_slot(parts):
    tok, ip, config = parts
    layout = token_layout(config, max_length=100_000)
    msgs = [{"role": "user", "content": "<image>这是<start_of_image><image_soft_token>什么？"},
            {"role": "assistant", "content": "<end_of_turn>结节"}]
    ids, _ = encode(msgs, get_template("gemma3"), tok, layout)
    assert ids.tolist().count(config.image_token_id) == config.mm_tokens_per_image  # the real image's only
    assert ids.tolist().count(tok.convert_tokens_to_ids("<start_of_image>")) == 1
    assert ids.tolist().count(tok.convert_tokens_to_ids("<end_of_turn>")) == 2  # the two turns' own ends


def test_saved_chat_template_renders_what_the_processor_renders(parts):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tok, ip, config = parts
    template = get_template("gemma3")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    ours, official = env.from_string(template.chat_template_jinja()), env.from_string(OFFICIAL)
    rng = random.Random(2)
    for _ in range(20):
        msgs, images = random_record(rng, n_images=rng.randint(0, 3), turns=rng.randint(1, 3))
        listed = their_messages(msgs, images)
        text = template.render(template.place_images(msgs)).text
        assert ours.render(messages=msgs, bos_token="<bos>") == text
        assert ours.render(messages=listed, bos_token="<bos>") == text == official.render(messages=listed,
                                                                                            bos_token="<bos>")


# --- training and chat, on the real stage code ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def g_data(tmp_path_factory):
    import json

    root = tmp_path_factory.mktemp("g_data")
    (root / "img").mkdir()
    rng, rows = random.Random(3), []
    for i in range(8):
        Image.new("RGB", (rng.randint(20, 90), rng.randint(20, 90)), (30 * i, 90, 200)).save(root / "img" / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(TEXTS)}, {"from": "gpt", "value": rng.choice(TEXTS)}]})
    (root / "train.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def g_align(tmp_path_factory, gemma_dir, g_data):
    from conftest import tiny_recipe

    from qilin_lite.train.stage import train_stage

    out = tmp_path_factory.mktemp("g_runs") / "align"
    return train_stage(tiny_recipe("align", "align", out, g_data / "train.json", g_data / "img",
                                   **{"model.base": str(gemma_dir)}))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}


def test_align_trains_the_projector_only(gemma_dir, g_align):
    from transformers import Gemma3ForConditionalGeneration

    from qilin_lite.model import RunInfo

    out, model = g_align
    base = _state(Gemma3ForConditionalGeneration.from_pretrained(str(gemma_dir), dtype=torch.float32))
    after = _state(model)
    changed = {k for k in base if k in after and not torch.equal(base[k], after[k])}
    assert changed and all(k.startswith("model.multi_modal_projector.") for k in changed), changed
    info = RunInfo.load(out)
    assert (info.kind, info.template, info.image_mode) == ("align", "gemma3", "crop")


@pytest.mark.parametrize("mode", ["qlora", "full"])
def test_tune_trains_what_the_mode_says_and_chat_answers(tmp_path, g_data, g_align, mode):
    from conftest import tiny_recipe

    from qilin_lite.serve.generate import load_generator
    from qilin_lite.train.stage import train_stage

    r = tiny_recipe("tune", mode, tmp_path / mode, g_data / "train.json", g_data / "img",
                    **{"model.from_run": str(g_align[0])})
    out, model = train_stage(r)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("vision_tower" in n for n in trainable)
    if mode == "qlora":
        assert all("lora_" in n or "multi_modal_projector.modules_to_save" in n for n in trainable), trainable
    else:
        assert any(n.startswith("model.language_model.") for n in trainable)
    gen, info = load_generator(str(out), dtype="float32", max_new_tokens=3, temperature=0)
    history = [{"role": "user", "content": "<image>\n病灶位于哪里？"}]
    assert isinstance(gen.generate([history], [[g_data / "img" / "0.png"]])[0], str)
    tok, ip = load_tokenizer_and_processor(str(out))
    proc = official_processor(tok, ip, gen.model.config)
    pil = [Image.open(g_data / "img" / "0.png").convert("RGB")]
    theirs = proc.apply_chat_template(their_messages(history, pil), tokenize=True, return_dict=True,
                                      add_generation_prompt=True)
    assert gen.last_prompt_ids == _ids(theirs)
    if mode == "qlora":  # merge folds the adapter into a plain Gemma 3 directory that answers the same
        from transformers import Gemma3ForConditionalGeneration

        from qilin_lite.merge import merge_run

        merged = merge_run(out, tmp_path / "merged", dtype="float32")
        assert not any("lora" in k for k in Gemma3ForConditionalGeneration.from_pretrained(str(merged)).state_dict())
        folded, _ = load_generator(str(merged), dtype="float32", max_new_tokens=3, temperature=0)
        image = [[g_data / "img" / "0.png"]]
        assert folded.generate([history], image) == gen.generate([history], image)
        assert folded.last_prompt_ids == gen.last_prompt_ids


def test_plan_sizes_this_family_from_its_directory(gemma_dir):
    """`plan --from DIR` counts the model in its own class and each image as its soft tokens; without a model it
    says to name one; an image size is refused (every image is resized to the tower's)."""
    from transformers import Gemma3ForConditionalGeneration

    from qilin_lite.config import REPO_RECIPES
    from qilin_lite.errors import UserError
    from qilin_lite.plan.cli import plan_recipe

    recipe = REPO_RECIPES / "medgemma-4b" / "tune-qlora.yaml"
    with pytest.raises(UserError, match="say which with --from"):
        plan_recipe(recipe)
    model = Gemma3ForConditionalGeneration.from_pretrained(gemma_dir)
    plan = plan_recipe(recipe, source=str(gemma_dir), device="cpu")
    assert plan.shape.total == sum(p.numel() for p in model.parameters())
    assert plan.shape.image_tokens == model.config.mm_tokens_per_image
    assert plan.shape.lm_head == 0  # tied to the embeddings, counted once
    with pytest.raises(UserError, match="--image-size: every image"):
        plan_recipe(recipe, source=str(gemma_dir), image_size="1024")


def test_packing_is_refused_in_one_line(tmp_path, gemma_dir, g_data):
    from conftest import tiny_recipe

    from qilin_lite.errors import UserError
    from qilin_lite.train.stage import train_stage

    with pytest.raises(UserError, match="do not survive packing"):
        train_stage(tiny_recipe("align", "align", tmp_path / "p", g_data / "train.json", g_data / "img",
                                **{"model.base": str(gemma_dir), "data.packing": True}))


def test_a_crashed_run_resumes_to_the_same_weights(tmp_path, g_data, g_align):
    """A lora run that dies after its step-3 checkpoint and resumes ends bit for bit where the uninterrupted run
    ends (the pixels, token_type_ids and dropout of every batch come back the same)."""
    from conftest import CRASH_RESUME, crash_and_resume, tiny_recipe

    def recipe(out):
        return tiny_recipe("tune", "lora", out, g_data / "train.json", g_data / "img",
                           **{**CRASH_RESUME, "model.from_run": str(g_align[0])})

    want, got = crash_and_resume(tmp_path, recipe)
    assert want.keys() == got.keys() and any("multi_modal_projector" in k for k in want)
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_the_web_page_sends_chats_prompt(tmp_path, g_data, g_align):
    """The web page's app on a tuned Gemma 3: two uploads of different sizes (each its own image, as the template
    takes them) and a DICOM reach the model with the prompt ids chat sends, each image its fixed soft tokens."""
    from conftest import tiny_recipe, web_sends_chats_prompt
    from test_chat import write_dicom

    from qilin_lite.train.stage import train_stage

    run, _ = train_stage(tiny_recipe("tune", "lora", tmp_path / "lora", g_data / "train.json", g_data / "img",
                                     **{"model.from_run": str(g_align[0])}))
    uploads = [[g_data / "img" / "1.png", g_data / "img" / "2.png"], [write_dicom(tmp_path / "ct.dcm")]]
    sent, gen = web_sends_chats_prompt(run, uploads)
    per_image = int(gen.model.config.mm_tokens_per_image)
    assert [ids.count(gen.layout.image_token_id) for ids in sent] == [2 * per_image, per_image]
