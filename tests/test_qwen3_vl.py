"""Qwen3-VL (family `qwen3-vl`, template `qwen3-vl`): training's ids and labels, and chat's prompt ids, against the
model's own code on varied records; what trains in align and tune --qlora; the 3-D positions a training step uses.

Ground truth:
- ids: the model's processor class (`Qwen3VLProcessor`) rendering the Instruct releases' chat template
  (tests/data/qwen3_vl/chat_template.jinja, its source in the README beside it) with
  `apply_chat_template(tokenize=True)` over the images, messages built as QwenLM's `qwen-vl-finetune` builds them
  (the Qwen3-VL repository's: the same `_build_messages` as for Qwen2.5-VL, restated in tests/test_qwen_vl.py);
- labels: `qwen-vl-finetune`'s rule (the same `preprocess_qwen_visual` for both models): from two tokens after each
  `assistant` token to one past the next `<|im_end|>`;
- trained parameters: their `set_model` (`tune_mm_mlp` is `model.visual.merger`, not the DeepStack mergers) and
  their LoRA (q/k/v/o).
The processor class cannot be constructed without torchvision (its video processor's mapping needs it); without it
the test builds the instance without `__init__` and gives it the tokenizer, the PIL image processor and the token
names `__init__` would set: its own `__call__` / `apply_chat_template` (the expansion of `<|image_pad|>`, the
`mm_token_type_ids`) run unchanged.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_qwen_vl import TEXTS, random_record, their_labels, their_messages

from qilin_lite.encoding import encode, prompt_ids
from qilin_lite.families import get_template, guess_template
from qilin_lite.images.pixel_values import NativeImageLoader
from qilin_lite.model import load_tokenizer_and_processor, token_layout

DATA = Path(__file__).parent / "data"
OFFICIAL = (DATA / "qwen3_vl" / "chat_template.jinja").read_text(encoding="utf-8")
QWEN2_5_OFFICIAL = (DATA / "qwen_vl" / "chat_template.jinja").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def qwen3_vl_dir(tmp_path_factory):
    from qilin_lite.demo.qwen_vl import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl"), TEXTS * 30)


@pytest.fixture(scope="module")
def parts(qwen3_vl_dir):
    from transformers import AutoConfig

    tok, ip = load_tokenizer_and_processor(str(qwen3_vl_dir))
    return tok, ip, AutoConfig.from_pretrained(str(qwen3_vl_dir))


def official_processor(tok, ip):
    from transformers import Qwen3VLProcessor

    try:
        return Qwen3VLProcessor(image_processor=ip, tokenizer=tok, chat_template=OFFICIAL)
    except Exception:  # noqa: BLE001 - no torchvision: the same class, its __init__ skipped (module docstring)
        p = object.__new__(Qwen3VLProcessor)
        p.tokenizer, p.image_processor, p.video_processor, p.chat_template = tok, ip, None, OFFICIAL
        for name in ("image", "video"):
            setattr(p, f"{name}_token", f"<|{name}_pad|>")
            setattr(p, f"{name}_token_id", tok.convert_tokens_to_ids(f"<|{name}_pad|>"))
        for name in ("start", "end"):
            setattr(p, f"vision_{name}_token", f"<|vision_{name}|>")
            setattr(p, f"vision_{name}_token_id", tok.convert_tokens_to_ids(f"<|vision_{name}|>"))
        return p


def theirs_ids(proc, msgs, images, **kw) -> tuple[list[int], dict]:
    out = proc.apply_chat_template(their_messages(msgs, images), tokenize=True, return_dict=True, **kw)
    ids = out["input_ids"]
    return list(ids[0] if len(ids) and not isinstance(ids[0], int) else ids), out


def test_the_tiny_release_is_recognised_as_its_own_family(qwen3_vl_dir, parts):
    from qilin_lite.families import family_of_config

    tok, ip, config = parts
    assert guess_template(str(qwen3_vl_dir)) == "qwen3-vl"
    family = family_of_config(config)
    assert (family.model_class, family.image_marks) == ("Qwen3VLForConditionalGeneration", "mm_token_type_ids")
    assert len(tok("assistant", add_special_tokens=False)["input_ids"]) == 1  # one token, as in Qwen's vocabulary
    assert type(ip).__name__.endswith("Pil") and (ip.patch_size, ip.merge_size) == (16, 2)
    assert NativeImageLoader(ip).tokens(256, 256) == 64  # one token per 32 x 32 px (28 x 28 in Qwen2.5-VL)


def test_ids_and_labels_equal_the_processor_and_qwen_vl_finetune(parts):
    tok, ip, config = parts
    proc = official_processor(tok, ip)
    template = get_template("qwen3-vl")
    layout = token_layout(config, max_length=100_000, length_mode="total")
    loader = NativeImageLoader(ip)
    rng = random.Random(10)
    checked, systems, sizes = 0, 0, set()
    for case in range(50):
        msgs, images = random_record(rng, n_images=rng.randint(0, 6), turns=rng.randint(1, 4))
        want, theirs = theirs_ids(proc, msgs, images)
        ids, labels = encode(msgs, template, tok, layout, loader.counts(images))
        assert ids.tolist() == want, case
        assert labels.tolist() == their_labels(want, tok), case
        if images:
            ours = loader.inputs(images)
            assert torch.equal(ours["image_grid_thw"], torch.as_tensor(theirs["image_grid_thw"]))
            assert np.allclose(ours["pixel_values"].numpy(), np.asarray(theirs["pixel_values"]))
            assert (ids == config.image_token_id).astype(int).tolist() == list(np.ravel(theirs["mm_token_type_ids"]))
        checked += len(images)
        systems += msgs[0]["role"] == "system"
        sizes |= {im.size for im in images}
    assert checked > 60 and len(sizes) > 40 and 5 < systems < 45  # many images of many sizes, with and without system


def test_chat_prompt_equals_the_processor_with_a_generation_prompt(parts):
    tok, ip, config = parts
    proc = official_processor(tok, ip)
    template = get_template("qwen3-vl")
    layout = token_layout(config, max_length=100_000)
    loader = NativeImageLoader(ip)
    rng = random.Random(11)
    for case in range(20):
        msgs, images = random_record(rng, n_images=rng.randint(1, 4), turns=rng.randint(1, 3))
        history = msgs[:-1]  # ends with the user turn being answered
        want, _ = theirs_ids(proc, history, images, add_generation_prompt=True)
        assert prompt_ids(history, template, tok, layout, loader.counts(images)).tolist() == want, case


def test_no_default_system_prompt_unlike_qwen2_5_vl():
    """The one difference in the text: Qwen2.5-VL's template (and `qwen2-vl`) open with its default system prompt,
    Qwen3-VL's (and `qwen3-vl`) with the user turn."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    msgs = [{"role": "user", "content": "<image>\n请描述图像。"}, {"role": "assistant", "content": "心影大小正常。"}]
    listed = their_messages(msgs, [None])
    for name, official, opening in (("qwen3-vl", OFFICIAL, "<|im_start|>user\n"),
                                    ("qwen2-vl", QWEN2_5_OFFICIAL, "<|im_start|>system\nYou are a helpful assistant.")):
        t = get_template(name)
        text = t.render(t.place_images(msgs)).text
        assert text == env.from_string(official).render(messages=listed) and text.startswith(opening), name
    with_system = [{"role": "system", "content": "你是一名放射科医生。"}, *msgs]
    qwen3 = get_template("qwen3-vl").render(with_system).text
    assert qwen3.startswith("<|im_start|>system\n你是一名放射科医生。<|im_end|>\n<|im_start|>user\n")


def test_saved_chat_template_renders_what_training_renders(parts):
    """The template saved with a run renders records' string content (with `<image>` tags) and list-of-parts
    content to the text training tokenizes, and the official template renders the same text from the parts."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = get_template("qwen3-vl")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders them
    ours, official = env.from_string(template.chat_template_jinja()), env.from_string(OFFICIAL)
    rng = random.Random(12)
    for _ in range(20):
        msgs, images = random_record(rng, n_images=rng.randint(0, 3), turns=rng.randint(1, 3))
        r = template.render(template.place_images(msgs))
        listed = their_messages(msgs, images)
        assert ours.render(messages=msgs) == r.text
        assert ours.render(messages=listed) == r.text == official.render(messages=listed)
        gen = template.render(template.place_images(msgs[:-1]), add_generation_prompt=True).text
        assert ours.render(messages=msgs[:-1], add_generation_prompt=True) == gen
        assert official.render(messages=listed[:-1], add_generation_prompt=True) == gen


def test_typed_vision_tokens_are_text_never_an_image_slot(parts):
    tok, ip, config = parts
    template = get_template("qwen3-vl")
    layout = token_layout(config, max_length=100_000)
    pad, start = (tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>"))
    msgs = [{"role": "user", "content": "<image>\n这是<|vision_start|><|image_pad|><|vision_end|>什么？"},
            {"role": "assistant", "content": "<|image_pad|>结节"}]
    ids, labels = encode(msgs, template, tok, layout, [4])
    assert ids.tolist().count(pad) == 4 and ids.tolist().count(start) == 1  # the real image's tokens only
    assert "<|vision_start|><|image_pad|><|vision_end|>什么" in tok.decode(ids[ids != pad])
    typed = template.typed_text("看<image>这里<|vision_start|><|image_pad|>")  # chat: what a person typed
    history = [{"role": "user", "content": typed}]
    ids = prompt_ids(history, template, tok, layout, []).tolist()
    assert pad not in ids and start not in ids and "<image>" not in typed
    assert "<|vision_start|><|image_pad|>" in tok.decode(ids)


# --- training, on the real stage code ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vl_data(tmp_path_factory):
    """Eight records, one image each at sizes from 40 to 250 px (4 to 64 image tokens), Chinese questions."""
    import json

    root = tmp_path_factory.mktemp("vl3_data")
    (root / "img").mkdir()
    rng, rows = random.Random(13), []
    for i in range(8):
        Image.new("RGB", (rng.randint(40, 250), rng.randint(40, 250)), (30 * i, 200 - 20 * i, 90)).save(
            root / "img" / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(TEXTS)}, {"from": "gpt", "value": rng.choice(TEXTS)}]})
    (root / "train.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return root


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}


def positions_seen(trainer_cls):
    """A trainer class that records, at every training step, the batch's keys and the position ids the language
    model is called with (the ones its rotary embedding uses)."""
    seen: list[dict] = []

    class Recording(trainer_cls):
        def training_step(self, model, inputs, *a, **k):
            lm = next(m for n, m in model.named_modules() if n.endswith("model.language_model"))
            hook = lm.register_forward_pre_hook(
                lambda mod, args, kw: seen.append({"keys": set(inputs), "ids": inputs["input_ids"].clone(),
                                                   "positions": kw["position_ids"].clone()}), with_kwargs=True)
            try:
                return super().training_step(model, inputs, *a, **k)
            finally:
                hook.remove()

    return Recording, seen


@pytest.fixture(scope="module")
def vl_align(tmp_path_factory, qwen3_vl_dir, vl_data):
    from conftest import tiny_recipe

    from qilin_lite.train.stage import train_stage
    from qilin_lite.train.trainer import QilinTrainer

    out = tmp_path_factory.mktemp("vl3_runs") / "align"
    r = tiny_recipe("align", "align", out, vl_data / "train.json", vl_data / "img",
                    **{"model.base": str(qwen3_vl_dir)})
    trainer_cls, seen = positions_seen(QilinTrainer)
    out, model = train_stage(r, trainer_cls=trainer_cls)
    return out, model, seen


def test_align_trains_the_merger_only(qwen3_vl_dir, vl_align):
    from safetensors.torch import load_file
    from transformers import Qwen3VLForConditionalGeneration

    from qilin_lite.model import RunInfo

    out, model, _ = vl_align
    base = state(Qwen3VLForConditionalGeneration.from_pretrained(str(qwen3_vl_dir), dtype=torch.float32))
    after = state(model)
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    assert changed and all(k.startswith("model.visual.merger.") for k in changed), changed
    assert any("deepstack_merger_list" in k for k in base)  # there, and frozen (qwen-vl-finetune's tune_mm_mlp)
    info = RunInfo.load(out)
    assert (info.kind, info.template, info.image_mode) == ("align", "qwen3-vl", "native")
    saved = load_file(str(out / "projector.safetensors"))
    assert {f"model.visual.merger.{k}" for k in saved} == {k for k in base if k.startswith("model.visual.merger.")}


def test_a_training_step_uses_the_3d_positions(vl_align, parts):
    """In the stage's own training steps the language model gets 3-D (M-RoPE) positions: an image's tokens share
    one time position and spread over its height and width, and text after an image continues from the image's
    largest side, not its token count (a 1-D fallback would number every token in turn)."""
    tok, ip, config = parts
    _, _, seen = vl_align
    assert seen and all({"mm_token_type_ids", "image_grid_thw", "pixel_values"} <= s["keys"] for s in seen)
    step = seen[0]
    pos, ids = step["positions"], step["ids"]
    assert pos.dim() == 3 and pos.shape[0] in (3, 4) and pos.shape[1:] == ids.shape
    thw = pos[-3:]  # (time, height, width); a leading fourth row, where given, is the text positions
    image = ids[0] == config.image_token_id
    t, h, w = (thw[k, 0, image] for k in range(3))
    assert len(set(t.tolist())) == 1 and len(set(h.tolist())) > 1 and len(set(w.tolist())) > 1
    sequential = torch.arange(ids.shape[1])
    assert not torch.equal(thw[0, 0], sequential)  # not the 1-D numbering


def test_without_the_marks_the_model_refuses_rather_than_falling_back(qwen3_vl_dir, parts):
    """Qwen3-VL raises where Qwen2.5-VL silently used 1-D positions: the batch must carry `mm_token_type_ids`."""
    from transformers import Qwen3VLForConditionalGeneration

    from qilin_lite.train.collator import Collator

    tok, ip, config = parts
    model = Qwen3VLForConditionalGeneration.from_pretrained(str(qwen3_vl_dir), dtype=torch.float32).eval()
    proc = official_processor(tok, ip)
    template = get_template("qwen3-vl")
    layout = token_layout(config, max_length=100_000, length_mode="total")
    loader = NativeImageLoader(ip)
    rng = random.Random(14)
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
    with torch.no_grad():
        ours = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for k, t in enumerate(theirs):  # the padded batch gives each record the processor's own logits
            want = model(**{k2: torch.as_tensor(v) for k2, v in t.items()}).logits[0]
            assert torch.allclose(ours[k, :want.shape[0]], want, atol=1e-5)
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            model(**{k: v for k, v in batch.items() if k not in ("labels", "mm_token_type_ids")})


def test_tune_full_trains_the_llm_and_the_merger_and_chat_answers(tmp_path, vl_data, vl_align):
    """--full from the align run: the LLM and the merger learn, the vision blocks and DeepStack's mergers stay
    frozen, and the finished run answers with chat's prompt."""
    from conftest import tiny_recipe

    from qilin_lite.serve.generate import load_generator
    from qilin_lite.train.stage import train_stage

    align_out, aligned, _ = vl_align
    start = state(aligned)
    out, model = train_stage(tiny_recipe("tune", "full", tmp_path / "full", vl_data / "train.json", vl_data / "img",
                                         **{"model.from_run": str(align_out)}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("model.language_model.") for n in trainable)
    assert any(n.startswith("model.visual.merger.") for n in trainable)
    assert not any("deepstack" in n or ".visual.blocks." in n for n in trainable)
    after = state(model)
    assert any(not torch.equal(after[n], start[n]) for n in trainable if n.startswith("model.language_model."))
    gen, _ = load_generator(str(out), dtype="float32", max_new_tokens=3, temperature=0)
    turn = [{"role": "user", "content": "<image>\n病灶位于哪里？"}]
    image = vl_data / "img" / "0.png"
    assert isinstance(gen.generate([turn], [[image]])[0], str)
    assert gen.last_prompt_ids == gen.prompt_ids(turn, gen.images.counts([gen.images.open(str(image))])).tolist()


def test_the_web_page_sends_chats_prompt_with_each_image_at_its_own_size(tmp_path, vl_data, vl_align):
    from conftest import tiny_recipe, web_sends_chats_prompt
    from test_chat import write_dicom

    from qilin_lite.images.pixel_values import NativeImageLoader
    from qilin_lite.train.stage import train_stage

    run, _ = train_stage(tiny_recipe("tune", "lora", tmp_path / "lora", vl_data / "train.json", vl_data / "img",
                                     **{"model.from_run": str(vl_align[0])}))
    uploads = [[vl_data / "img" / "1.png", vl_data / "img" / "4.png"], [write_dicom(tmp_path / "ct.dcm")]]
    sent, gen = web_sends_chats_prompt(run, uploads)
    for served, shown in zip(sent, uploads):
        sizes = [NativeImageLoader(gen.images.processor).raw(p).size for p in shown]
        assert served.count(gen.layout.image_token_id) == sum(gen.images.tokens(*s) for s in sizes)


def test_tune_qlora_from_the_align_run_trains_lora_and_the_merger_only(tmp_path, vl_data, vl_align):
    from conftest import tiny_recipe

    from qilin_lite.train.stage import train_stage

    align_out, aligned, _ = vl_align
    start = state(aligned)
    r = tiny_recipe("tune", "qlora", tmp_path / "qlora", vl_data / "train.json", vl_data / "img",
                    **{"model.from_run": str(align_out)})
    out, model = train_stage(r)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".merger.modules_to_save." in n for n in trainable), trainable
    assert not any("deepstack" in n or ".visual.blocks." in n for n in trainable)
    lora_at = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_" in n}
    assert lora_at == {"q_proj", "k_proj", "v_proj", "o_proj"}  # qwen-vl-finetune's targets, the LLM's only
    assert all("language_model" in n for n in trainable if "lora_" in n)
    after = {n: p.detach().float() for n, p in model.named_parameters()}
    assert any("lora_B" in n and after[n].abs().sum() > 0 for n in trainable)  # B starts at zero: it moved
    merger = {n: v for n, v in after.items() if n in trainable and ".merger.modules_to_save." in n}
    assert merger and any(not torch.equal(v, start[n.replace("base_model.model.", "").replace(
        ".modules_to_save.default", "")]) for n, v in merger.items())
    assert all(torch.isfinite(after[n]).all() for n in trainable)
    assert (out / "adapter_model.safetensors").is_file()


def test_chat_answers_with_the_trained_prompt(vl_data, vl_align):
    """chat's generator on the align run: the prompt ids are the processor's for the same question and images (no
    system turn), and an answer comes back."""
    from qilin_lite.serve.generate import load_generator

    out, _, _ = vl_align
    gen, info = load_generator(str(out), dtype="float32", max_new_tokens=4, temperature=0)
    assert (info.template, info.image_mode) == ("qwen3-vl", "native")
    tok, ip = load_tokenizer_and_processor(str(out))
    paths = [vl_data / "img" / "0.png", vl_data / "img" / "5.png"]
    history = [{"role": "user", "content": "<image>\n<image>\n病灶位于哪里？"}]
    answer = gen.generate([history], [paths])[0]
    assert isinstance(answer, str)
    want, _ = theirs_ids(official_processor(tok, ip), history, [Image.open(p).convert("RGB") for p in paths],
                         add_generation_prompt=True)
    assert gen.last_prompt_ids == want
    assert tok.decode(want[:2]) == "<|im_start|>user"


def test_the_command_line_tunes_a_released_model_directory_and_merge_folds_it(tmp_path, qwen3_vl_dir, vl_data,
                                                                              monkeypatch, capsys):
    """`qilin-lite tune --lora --from DIR` with DIR a Qwen3-VL release (no qilin.json), as users pass
    `--from Qwen/Qwen3-VL-8B-Instruct`: the template settles to the model's own; `merge` then writes a plain
    Qwen3VLForConditionalGeneration directory that answers as the adapter run does."""
    from conftest import run_cli_captured
    from peft import PeftModel
    from transformers import Qwen3VLForConditionalGeneration

    from qilin_lite.merge import merge_run
    from qilin_lite.model import RunInfo
    from qilin_lite.serve.generate import load_generator

    out = tmp_path / "run"
    code, stdout, stderr = run_cli_captured(
        monkeypatch, capsys, "tune", "--lora", "--from", qwen3_vl_dir, "--data", vl_data / "train.json",
        "--image-folder", vl_data / "img", "--out", out, "--set", "train.max_steps=2", "--set", "model.dtype=float32",
        "--set", "train.bf16=false", "--set", "train.global_batch=2", "--set", "train.per_device_batch=2",
        "--set", "data.num_workers=0", "--set", "train.lora_r=4", "--set", "train.lr=1e-2")
    assert code == 0, stderr[-2000:]
    info = RunInfo.load(out)
    assert (info.kind, info.template, info.image_mode) == ("lora", "qwen3-vl", "native")
    merged = merge_run(out, tmp_path / "merged", dtype="float32")
    assert (RunInfo.load(merged).kind, RunInfo.load(merged).template) == ("merged", "qwen3-vl")
    plain = Qwen3VLForConditionalGeneration.from_pretrained(str(merged), dtype=torch.float32)
    assert not any("lora" in k or "modules_to_save" in k for k in plain.state_dict())
    tuned, _ = load_generator(str(out), dtype="float32", max_new_tokens=6, temperature=0)
    folded, _ = load_generator(str(merged), dtype="float32", max_new_tokens=6, temperature=0)
    assert isinstance(tuned.model, PeftModel)
    question, image = [[{"role": "user", "content": "<image>\n病灶位于哪里？"}]], [[vl_data / "img" / "2.png"]]
    assert folded.generate(question, image) == tuned.generate(question, image)
    assert folded.last_prompt_ids == tuned.last_prompt_ids


def test_plan_sizes_qwen3_vl_with_its_32_px_tokens(qwen3_vl_dir):
    """`plan --from DIR` counts the Qwen3-VL class (DeepStack mergers with the tower) and an image as its processor
    does: one token per 32 x 32 px (16 px patches, 2 x 2 merged), within the directory's own pixel bounds."""
    from transformers import Qwen3VLForConditionalGeneration

    from qilin_lite.config import REPO_RECIPES
    from qilin_lite.images.pixel_values import NativeImageLoader
    from qilin_lite.model import load_tokenizer_and_processor
    from qilin_lite.plan.cli import plan_recipe

    model = Qwen3VLForConditionalGeneration.from_pretrained(qwen3_vl_dir)
    _, processor = load_tokenizer_and_processor(str(qwen3_vl_dir))
    loader = NativeImageLoader(processor)
    for w, h in ((40, 40), (230, 97), (1024, 1024)):
        plan = plan_recipe(REPO_RECIPES / "qwen3-vl-8b" / "tune-qlora.yaml", ["data.min_pixels=null", "data.max_pixels=null"],
                           source=str(qwen3_vl_dir), image_size=f"{w}x{h}", device="cpu")
        assert plan.shape.total == sum(p.numel() for p in model.parameters())
        assert plan.shape.image_tokens == loader.tokens(w, h), (w, h)


def test_a_thinking_release_is_refused_in_one_line(tmp_path, qwen3_vl_dir, monkeypatch, capsys):
    """Qwen3-VL-*-Thinking shares the Instruct model_type but not its template (each answer opens with <think>):
    refused by its chat template or its name, before any work, rather than trained in the Instruct format."""
    import shutil

    from conftest import run_cli_captured

    from qilin_lite.families import guess_template

    assert guess_template(str(qwen3_vl_dir)) == "qwen3-vl"
    thinking = tmp_path / "local-copy"
    shutil.copytree(qwen3_vl_dir, thinking)
    (thinking / "chat_template.jinja").write_text((DATA / "qwen3_vl" / "chat_template_thinking.jinja").read_text(encoding="utf-8"),
                                                  encoding="utf-8")
    named = tmp_path / "Qwen3-VL-8B-Thinking"
    shutil.copytree(qwen3_vl_dir, named)
    for d in (thinking, named):
        code, stdout, stderr = run_cli_captured(monkeypatch, capsys, "tune", "--lora", "--from", d, "--data",
                                                tmp_path / "none.json", "--out", tmp_path / f"run-{d.name}")
        assert code == 2 and "Thinking release" in stderr and "Traceback" not in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / f"run-{d.name}").exists()


def test_a_crashed_run_resumes_to_the_same_weights_and_eval_scores_it(tmp_path, vl_data, vl_align):
    """A lora run with --eval-task that dies after its step-3 checkpoint and resumes ends bit for bit where the
    uninterrupted run ends (image grids, DeepStack features and marks of every batch come back the same), with the
    same evaluation history; and `eval` on the finished run gives the score logged at its last step."""
    import json

    from conftest import CRASH_RESUME, crash_and_resume, tiny_recipe

    from qilin_lite.eval.run import run_benchmark

    def recipe(out):
        return tiny_recipe("tune", "lora", out, vl_data / "train.json", vl_data / "img",
                           **{**CRASH_RESUME, "model.from_run": str(vl_align[0]),
                              "data.eval_task": str(vl_data / "train.json"), "train.eval_every": 2})

    want, got = crash_and_resume(tmp_path, recipe)
    assert want.keys() == got.keys() and any("merger" in k for k in want)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    whole, cut = (json.loads((tmp_path / d / "eval_history.json").read_text(encoding="utf-8")) for d in ("whole", "cut"))
    assert [h["step"] for h in whole] == [2, 4, 6, 8] and [(h["step"], h["value"]) for h in cut] == [
        (h["step"], h["value"]) for h in whole]
    scored = run_benchmark(vl_data / "train.json", "llava", tmp_path / "eval", model=str(tmp_path / "cut"),
                           image_folder=vl_data / "img", dtype="float32", attn="sdpa")
    assert scored["groups"]["all"]["open_recall"] == whole[-1]["value"]
