"""convert reads HuatuoGPT-Vision's release layout: a tiny `LlavaQwen2ForCausalLM` checkpoint (Qwen2 weights, the
projector, the CLIP tower inside the weights, `./vit/clip_vit_large_patch14_336` beside them with a config and a
pickle that must not be read) converts to a Llava directory whose logits equal a hand computation from the source
tensors, carries the `huatuo` template and its cli.py's decoding, and chats with the prompt ids its authors' cli.py
builds (tests/data/huatuo/expected.json, see test_huatuo.py) for 1, 2 and 6 images and a second turn."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qilin_lite.families import IMAGE_TOKEN

DATA = Path(__file__).parent / "data" / "huatuo"
EXPECTED = {c["name"]: c for c in json.loads((DATA / "expected.json").read_text(encoding="utf-8"))["cases"]}


def write_huatuo_checkpoint(tiny_parts, out: Path) -> dict:
    """A tiny model saved as HuatuoGPT-Vision-7B is released; returns its tensors (names as in the release)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

    vision_dir = Path(tiny_parts[0])
    out.mkdir(parents=True)
    for f in DATA.glob("tokenizer*"):
        shutil.copy(f, out)
    n_tok = len(AutoTokenizer.from_pretrained(out))
    torch.manual_seed(0)
    clip = CLIPVisionModel.from_pretrained(vision_dir)
    h = clip.config.hidden_size
    qcfg = Qwen2Config(vocab_size=n_tok + 13, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=False, eos_token_id=n_tok - 3, bos_token_id=n_tok - 3)
    lm = Qwen2ForCausalLM(qcfg)
    state = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for layer in ("0", "2"):
        state[f"model.mm_projector.{layer}.weight"] = torch.randn(h, h, generator=g) * 0.2
        state[f"model.mm_projector.{layer}.bias"] = torch.randn(h, generator=g) * 0.2
    state.update({"model.vision_tower.vision_tower." + k: v.detach().clone() for k, v in clip.state_dict().items()})
    cfg = {k: v for k, v in qcfg.to_dict().items() if k not in ("dtype", "torch_dtype", "transformers_version")}
    cfg.update({  # the keys HuatuoGPT-Vision-7B's config.json has beyond Qwen2's
        "architectures": ["LlavaQwen2ForCausalLM"], "model_type": "llava_qwen2", "torch_dtype": "float32",
        "image_aspect_ratio": "pad", "mm_hidden_size": h, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": "./vit/clip_vit_large_patch14_336", "tokenizer_model_max_length": 4096,
        "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False, "use_cache": False, "use_mm_proj": True,
    })
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    vit = out / "vit" / "clip_vit_large_patch14_336"
    vit.mkdir(parents=True)
    CLIPConfig(vision_config=clip.config.to_dict()).save_pretrained(vit)  # the release ships the whole CLIP config
    shutil.copy(vision_dir / "preprocessor_config.json", vit)
    (vit / "pytorch_model.bin").write_bytes(b"a pickle convert must never open")
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        fname = f"model-0000{i}-of-00002.safetensors"
        save_file({k: state[k].contiguous() for k in part}, str(out / fname))
        weight_map.update({k: fname for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


@torch.no_grad()
def reference_logits(state: dict, src: Path, input_ids, image_id: int, pixel_values):
    """LlavaQwen2's forward by hand from the source tensors: CLIP layer -2 patches -> mlp2x_gelu -> Qwen2."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

    clip = CLIPVisionModel(CLIPVisionConfig.from_pretrained(src / "vit" / "clip_vit_large_patch14_336")).eval()
    prefix = "model.vision_tower.vision_tower."
    clip.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    cfg = {k: v for k, v in json.loads((src / "config.json").read_text()).items() if not k.startswith("mm_")}
    qwen = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in cfg.items() if k != "model_type"})).eval()
    qwen.load_state_dict({k: v for k, v in state.items() if not k.startswith(("model.mm_projector", prefix))})
    patches = clip(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    hidden = F.gelu(F.linear(patches, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"]))
    features = F.linear(hidden, state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])
    is_image = input_ids == image_id
    embeds = qwen.model.embed_tokens(torch.where(is_image, 0, input_ids))
    embeds[is_image] = features.reshape(-1, features.shape[-1])
    return qwen(inputs_embeds=embeds).logits


@pytest.fixture(scope="module")
def converted(tiny_parts, tmp_path_factory):
    from conftest import run_cli

    root = tmp_path_factory.mktemp("huatuo")
    src, dst = root / "HuatuoGPT-Vision-7B", root / "converted"
    state = write_huatuo_checkpoint(tiny_parts, src)
    mp = pytest.MonkeyPatch()
    try:
        assert run_cli(["convert", str(src), str(dst)], mp) == 0  # no --vision-tower: the release's own ./vit
    finally:
        mp.undo()
    return src, dst, state


def test_converted_logits_equal_the_source_computation(converted, tiny_data):
    from transformers import AutoTokenizer, GenerationConfig, LlavaForConditionalGeneration

    from qilin_lite.families import get_template
    from qilin_lite.serve.generate import Generator
    from qilin_lite.model import RunInfo, load_image_processor, token_layout
    from qilin_lite.images.pixel_values import ImageLoader

    src, dst, state = converted
    info = RunInfo.load(dst)
    assert (info.kind, info.template, info.image_mode) == ("converted", "huatuo", "pad")
    assert json.loads((dst / "conversion.json").read_text())["vision_weights"] == "checkpoint"
    gen_cfg = GenerationConfig.from_pretrained(dst)  # its cli.py's gen_kwargs, for any transformers user too
    assert (gen_cfg.do_sample, gen_cfg.temperature, gen_cfg.repetition_penalty, gen_cfg.max_new_tokens) == \
        (True, 0.2, 1.2, 512)

    model, loading = LlavaForConditionalGeneration.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"]
    tok = AutoTokenizer.from_pretrained(dst)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = state["lm_head.weight"].shape[0]
    assert image_id < rows and model.config.text_config.vocab_size == rows  # a padded vocabulary: no row added
    images = sorted(Path(tiny_data["images"]).glob("img_*.png"))[:2]
    prompt = Generator(None, tok, None, get_template("huatuo"), token_layout(model.config, 10**9))
    ids = torch.from_numpy(prompt.prompt_ids([{"role": "user", "content": f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n病灶位于哪里？"}]))[None]
    pixels = ImageLoader(load_image_processor(str(dst)), "pad")(images)
    with torch.no_grad():
        got = model.eval()(input_ids=ids, pixel_values=pixels).logits
    want = reference_logits(state, src, ids, image_id, pixels)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("case,n", [("one image", 1), ("two images", 2), ("six images", 6),
                                    ("second turn, no new image", 1), ("nested end tags", 1),
                                    ("nested end tags in the history", 1), ("nested image tag", 2)])
def test_chat_sends_the_prompt_ids_their_cli_builds(case, n, converted, tiny_data):
    """The ids chat sends (typed text moderated once, as cli.py does); where cli.py's prompt is invalid (a typed
    `<<image>image>`, which it makes one image slot more than images), that slot is the text it spells."""
    from qilin_lite.serve.chat_session import ChatSession

    _, dst, _ = converted
    want = EXPECTED[case]
    session = ChatSession.load(str(dst), temperature=0, max_new_tokens=2)
    paths = sorted(Path(tiny_data["images"]).glob("img_*.png"))[:n]
    session.load_image(paths)
    assert len(session.images) == n and session.template.name == "huatuo"
    turns = want["turns"]
    if len(turns) == 2:  # the first answer as their history holds it, then the second question
        session.history = [{"role": "user", "content": f"{IMAGE_TOKEN}\n" * n + turns[0]["question"]},
                           {"role": "assistant", "content": want["answers"][0]}]
        session.asked = n  # the first question carried the images
    session.ask(turns[-1]["question"])
    image_id = session.generator.layout.image_token_id
    per_image = session.generator.layout.num_image_tokens
    theirs, slots = [], 0
    for i in want["ids"]:  # each of their image slots expanded; one past the images: the text it spells
        if i == -200:
            theirs += [image_id] * per_image if slots < n else want["text_image"]
            slots += 1
        else:
            theirs.append(i)
    assert session.generator.last_prompt_ids == theirs and theirs.count(image_id) == n * per_image
    assert "repetition_penalty" in dict(session.template.generation)


def test_web_shows_the_model_separate_images_as_chat_does(converted, tiny_data):
    """The page learns the template's rule from /api/info; three uploads reach the model as three images, with the
    prompt ids chat sends for the same files and question."""
    import base64

    from qilin_lite.errors import UserError
    from qilin_lite.serve.generate import load_generator
    from qilin_lite.serve.chat_session import ChatSession
    from qilin_lite.serve.web_app import WebApp

    _, dst, _ = converted
    gen, info = load_generator(str(dst), temperature=0, max_new_tokens=2)
    web = WebApp(gen, info, "run")
    assert web.describe()["images"] == {"max": 6, "mode": "separate"}
    sid = web.new_session()
    paths = sorted(Path(tiny_data["images"]).glob("img_*.png"))[:3]
    files = [{"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p in paths]
    shown = web.set_image(sid, files)
    assert shown["images"] == 3 and shown["width"] == 3 * shown["height"]  # previewed in a row
    events = list(web.ask(sid, "病灶位于哪里？", {}))
    assert events[-1].get("done")
    served = list(gen.last_prompt_ids)
    chat = ChatSession.load(str(dst), temperature=0, max_new_tokens=2)
    chat.load_image(paths)
    chat.ask("病灶位于哪里？")
    assert served == chat.generator.last_prompt_ids
    assert served.count(gen.layout.image_token_id) == 3 * gen.layout.num_image_tokens
    with pytest.raises(UserError, match="at most 6 images"):
        web.set_image(sid, files * 3)


def test_web_adds_images_to_the_next_question_as_chat_does(converted, tiny_data, tmp_path):
    """The page's "add images" (chat's /add): two images, a question, one image more, a second question; the model
    gets the prompt ids chat builds for the same steps, the conversation is kept, the preview shows all three, and
    a seventh image is refused before anything is decoded."""
    import base64

    from qilin_lite.errors import UserError
    from qilin_lite.serve.generate import load_generator
    from qilin_lite.serve.chat_session import ChatSession
    from qilin_lite.serve.web_app import WebApp

    _, dst, _ = converted
    gen, info = load_generator(str(dst), temperature=0, max_new_tokens=2)
    web = WebApp(gen, info, "run", log_dir=tmp_path / "logs")
    sid = web.new_session()
    paths = sorted(Path(tiny_data["images"]).glob("img_*.png"))[:3]
    files = [{"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p in paths]
    questions = ["病灶位于哪里？", "第三张图呢？"]
    assert web.set_image(sid, files[:2])["images"] == 2
    assert list(web.ask(sid, questions[0], {}))[-1].get("done")
    shown = web.set_image(sid, files[2:], add=True)
    assert shown["images"] == 3 and shown["width"] == 3 * shown["height"]
    assert len(web.session(sid).chat.history) == 2  # the first question and answer are kept
    assert list(web.ask(sid, questions[1], {}))[-1].get("done")
    served = list(gen.last_prompt_ids)
    chat = ChatSession.load(str(dst), temperature=0, max_new_tokens=2)
    chat.load_image(paths[:2])
    chat.ask(questions[0])
    chat.add_images(paths[2:])
    chat.ask(questions[1])
    assert served == chat.generator.last_prompt_ids
    assert served.count(gen.layout.image_token_id) == 3 * gen.layout.num_image_tokens
    [log] = list((tmp_path / "logs").iterdir())  # one conversation: the first view and the view after the add
    assert sorted(f.name for f in log.glob("image*.png")) == ["image-3.png", "image.png"]
    not_images = [{"name": f"{i}.png", "data": "bm90IGFuIGltYWdl"} for i in range(4)]
    with pytest.raises(UserError, match="at most 6 images"):  # 3 + 4; not "not an image": nothing was decoded
        web.set_image(sid, not_images, add=True)
    assert len(web.session(sid).chat.images) == 3


@pytest.mark.slow
def test_the_page_adds_images_to_the_next_question(converted, tiny_data, tmp_path):
    """In the browser: the "add images" button appears for a separate-image template once an image is loaded; an
    added image keeps the conversation, and the next question gets an answer."""
    from conftest import web_server
    from test_web import _browser_path, open_page

    path = _browser_path()
    if path is None:
        pytest.skip("no chromium here (scripts/test.sh installs Debian's chromium where apt-get can)")
    pw = pytest.importorskip("playwright.sync_api")
    _, dst, _ = converted
    images = sorted(Path(tiny_data["images"]).glob("img_*.png"))[:3]
    answers = "document.querySelectorAll('#chat .assistant').length"
    with web_server(["--model", dst, "--temperature", "0", "--max-new-tokens", "4"], tmp_path / "server.log") as port, \
            pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        ctx, page = open_page(browser, f"http://127.0.0.1:{port}", [])
        assert not page.is_visible("#add")  # no image yet
        page.set_input_files("#image-upload", [str(f) for f in images[:2]])
        page.wait_for_function("document.getElementById('preview').style.display === 'block'")
        assert page.is_visible("#add") and page.inner_text("#error") == ""
        page.fill("#question", "病灶位于哪里？")
        page.press("#question", "Enter")
        page.wait_for_function(f"!document.getElementById('send').disabled && {answers} === 1")
        page.set_input_files("#add-upload", [str(images[2])])
        page.wait_for_function("document.getElementById('image-info').textContent.includes('3')")
        assert page.inner_text("#error") == "" and page.locator("#chat .user").count() == 1  # conversation kept
        page.fill("#question", "第三张图呢？")
        page.press("#question", "Enter")
        page.wait_for_function(f"!document.getElementById('send').disabled && {answers} === 2")
        assert page.inner_text("#error") == ""
        artifacts = Path(os.environ.get("QILIN_TEST_ARTIFACTS", tmp_path))
        artifacts.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(artifacts / "web-add.png"), full_page=True)
        ctx.close()
        browser.close()


def test_tune_from_the_converted_model_keeps_its_template(converted, tiny_data, tmp_path):
    """`tune --lora --from CONVERTED` continues training HuatuoGPT-Vision on a user's data in its own format."""
    from conftest import tiny_recipe

    from qilin_lite.serve.generate import load_generator
    from qilin_lite.model import RunInfo
    from qilin_lite.train.stage import run_stage

    _, dst, _ = converted
    out = tmp_path / "tuned"
    recipe = tiny_recipe("tune", "lora", out, Path(tiny_data["tune"]), Path(tiny_data["images"]),
                         **{"model.from_run": str(dst), "train.max_steps": 1})
    assert recipe.data.template is None  # not named: the model's own is taken
    run_stage(recipe)
    info = RunInfo.load(out)
    assert (info.kind, info.template) == ("lora", "huatuo")
    from qilin_lite.config import load_recipe

    assert load_recipe(str(out / "recipe.yaml")).data.template == "huatuo"  # recorded, so --resume compares it
    gen, _ = load_generator(str(out), temperature=0, max_new_tokens=2)
    assert gen.template.name == "huatuo" and dict(gen.template.generation)["repetition_penalty"] == 1.2


def test_image_writes_one_png_per_image_for_separate_templates(converted, tiny_data, tmp_path):
    from qilin_lite.errors import UserError
    from qilin_lite.serve.image_file import prepare_image

    _, dst, _ = converted
    paths = sorted(Path(tiny_data["images"]).glob("img_*.png"))[:2]
    with pytest.raises(UserError, match="write one PNG per image"):
        prepare_image(paths, tmp_path / "both.png", model=str(dst))
    assert prepare_image(paths[:1], tmp_path / "one.png", model=str(dst)).is_file()


def test_a_hf_release_without_qilin_json_gets_its_own_template(converted, tmp_path):
    """The `-hf` release is already a LlavaForConditionalGeneration: it loads as it is, HuatuoGPT-Vision by its name
    (as its cli.py tells its models apart) in `huatuo`, another Qwen2 Llava in ChatML."""
    from qilin_lite.serve.generate import load_generator
    from qilin_lite.model import template_of

    _, dst, _ = converted
    hf = tmp_path / "HuatuoGPT-Vision-7B-hf"
    shutil.copytree(dst, hf)
    (hf / "qilin.json").unlink()
    other = tmp_path / "some-qwen2-llava"
    shutil.copytree(hf, other)
    assert (template_of(str(hf)), template_of(str(other))) == ("huatuo", "chatml")
    gen, info = load_generator(str(hf), temperature=0, max_new_tokens=1)
    assert gen.template.name == "huatuo" and info.kind == "base"


def test_images_added_in_a_later_turn_go_in_front_of_that_question(converted, tiny_data):
    """`/add` (HuatuoGPT-Vision's cli.py adds a round's images to that round): the second question carries its own
    image, with the prompt ids their cli.py builds (tests/data/huatuo 'second turn': 2 images, then 1 more)."""
    from qilin_lite.errors import UserError
    from qilin_lite.serve.chat_session import ChatSession

    _, dst, _ = converted
    want = EXPECTED["second turn"]
    paths = sorted(Path(tiny_data["images"]).glob("img_*.png"))[:3]
    session = ChatSession.load(str(dst), temperature=0, max_new_tokens=2)
    session.load_image(paths[:2])
    session.ask(want["turns"][0]["question"])
    session.history[-1]["content"] = want["answers"][0]  # their history's answer, so the ids can be compared
    session.add_images(paths[2:])
    session.ask(want["turns"][1]["question"])
    image_id, per = session.generator.layout.image_token_id, session.generator.layout.num_image_tokens
    assert session.generator.last_prompt_ids == [x for i in want["ids"] for x in ([image_id] * per if i == -200 else [i])]
    session.regenerate()  # the last question again, with the image it carried
    assert session.generator.last_prompt_ids.count(image_id) == 3 * per
    with pytest.raises(UserError, match="at most 6 images"):
        session.add_images(paths[:1] * 4)


@pytest.fixture(scope="module")
def huatuo_gguf(converted, tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama.cpp not built here (scripts/llama-cpp.sh needs a C++ compiler)")
    from qilin_lite.export import export_gguf

    return export_gguf(converted[1], tmp_path_factory.mktemp("huatuo_gguf") / "f16", quant="f16")


@pytest.mark.parametrize("case,n", [("one image", 1), ("two images", 2), ("six images", 6), ("no image", 0),
                                    ("typed tags and spaces", 1)])
def test_llama_cpp_sends_the_exported_model_the_ids_their_cli_builds(case, n, converted, huatuo_gguf, tiny_data,
                                                                      tmp_path):
    """The GGUF export of a converted HuatuoGPT-Vision, run as llama-mtmd-cli runs it (its chat template, a marker per
    image in front of the question), gets the prompt ids their cli.py builds, each image its own tokens; its next-token
    logits follow the converted model's on the same ids and pixels (f16 weights, llama.cpp's own resize), ten times
    nearer them than the logits for mirrored images."""
    import numpy as np
    from transformers import LlavaForConditionalGeneration

    from benchmarks.harness.llama_cpp import LlamaCppLlava
    from qilin_lite.serve.image_file import prepare_image
    from qilin_lite.model import load_image_processor, token_layout
    from qilin_lite.images.pixel_values import ImageLoader

    _, dst, _ = converted
    want = EXPECTED[case]
    files = sorted(Path(tiny_data["images"]).glob("img_*.png"))[:n]
    pngs = [prepare_image([f], tmp_path / f"{i}.png", model=str(dst)) for i, f in enumerate(files)]
    m = LlamaCppLlava(huatuo_gguf.model, huatuo_gguf.mmproj)
    try:
        got = m.answer(pngs, want["turns"][0]["question"], max_new_tokens=1)
    finally:
        m.close()
    model = LlavaForConditionalGeneration.from_pretrained(dst, dtype=torch.float32).eval()
    layout = token_layout(model.config, 10**9)
    def expand(image):  # their -200 per image -> one id per image position
        return [x for i in want["ids"] for x in ([image] * layout.num_image_tokens if i == -200 else [i])]

    assert got["prompt_ids"] == expand(None)
    ids = torch.tensor([expand(layout.image_token_id)])
    pixels = ImageLoader(load_image_processor(str(dst)), "pad")(pngs) if pngs else None
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels).logits[0, -1].numpy()
        # the same prompt with every image mirrored: llama.cpp's logits must be nearer the right pixels' than these
        mirrored = model(input_ids=ids, pixel_values=pixels.flip(-1)).logits[0, -1].numpy() if n else None
    theirs = got["first_logits"][: len(ours)]
    cos = float(np.dot(ours, theirs) / (np.linalg.norm(ours) * np.linalg.norm(theirs)))
    assert cos > 0.9999, cos
    if n:
        assert np.abs(theirs - ours).max() < 0.1 * np.abs(theirs - mirrored).max()  # measured: 0.01


@pytest.mark.slow
def test_llama_server_renders_and_tokenizes_the_prompt_chat_sends(converted, huatuo_gguf, tmp_path):
    """llama-server's own Jinja and tokenizer over the export: the huatuo prompt for a first turn with images and a
    later turn (past rounds without an end token, as their cli.py sends them), chat's ids for text turns."""
    from conftest import llama_server_on, served_prompt_is_chats

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    cases = [
        ([{"role": "user", "content": [image, image, {"type": "text", "text": "两张图像有何不同？"}]}],
         [{"role": "user", "content": "<image>\n<image>\n两张图像有何不同？"}]),
        ([{"role": "user", "content": [image, {"type": "text", "text": "有病灶吗？"}]},
          {"role": "assistant", "content": "有"}, {"role": "user", "content": "在哪一侧？"}],
         [{"role": "user", "content": "<image>\n有病灶吗？"}, {"role": "assistant", "content": "有"},
          {"role": "user", "content": "在哪一侧？"}]),
        ([{"role": "user", "content": "病灶\u00a0在哪？"}, {"role": "assistant", "content": "左侧"},
          {"role": "user", "content": "多大？"}],
         [{"role": "user", "content": "病灶\u00a0在哪？"}, {"role": "assistant", "content": "左侧"},
          {"role": "user", "content": "多大？"}]),
    ]
    with llama_server_on(huatuo_gguf.model, huatuo_gguf.mmproj, tmp_path / "server.log") as url:
        served_prompt_is_chats(url, converted[1], cases)


def test_a_release_without_its_vision_tower_is_told_to_pass_vision_tower(tiny_parts, tmp_path):
    """A checkpoint whose shards lack the CLIP tower names the flag that supplies it, not just a count (issue 34)."""
    from qilin_lite.convert import convert_checkpoint
    from qilin_lite.errors import UserError

    src = tmp_path / "HuatuoGPT-Vision-7B"
    write_huatuo_checkpoint(tiny_parts, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        part = load_file(str(src / shard))
        save_file({k: v for k, v in part.items() if not k.startswith("model.vision_tower.")}, str(src / shard))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.vision_tower.")}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="has no vision tower.*pass the CLIP tower it was trained with: --vision-tower"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
