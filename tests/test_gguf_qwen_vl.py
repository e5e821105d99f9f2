"""`export gguf` for Qwen2.5-VL and Qwen3-VL: llama.cpp's qwen2vl / qwen3vl LLM + a qwen2.5vl_merger / qwen3vl_merger
mmproj, run in llama.cpp itself
(llama-cpp-python's libllama + libmtmd, built by scripts/llama-cpp.sh): image features at each image's own size
equal the trained model's, the prompt ids equal chat's, greedy answers equal chat's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import post_json, run_cli_captured, smooth_image_run

from qilin_lite.errors import UserError

QUESTION = "病灶位于哪一侧？"
TEXTS = ["胸部X光片显示双肺纹理清晰，未见明显异常。", "这张CT图像中病灶位于哪里？", "左肺上叶可见结节影。",
         "请描述图像。", "心影大小正常。", QUESTION]
SIZES = [(56, 56), (224, 224), (100, 180), (300, 90), (37, 61)]  # 4 to 64 tokens, odd sizes resized both ways
# what llama.cpp calls each family: LLM architecture, projector type, tensors only its mmproj has, pixels a token
FAMILY = {
    "qwen2.5-vl": dict(arch="qwen2vl", projector="qwen2.5vl_merger", unit=28,
                       tensors={"v.blk.0.attn_q.weight", "v.blk.1.ffn_gate.weight"}),
    "qwen3-vl": dict(arch="qwen3vl", projector="qwen3vl_merger", unit=32,
                     tensors={"v.blk.0.attn_qkv.weight", "v.position_embd.weight", "v.patch_embd.bias",
                              "v.deepstack.0.fc1.weight", "v.deepstack.0.norm.bias"}),
}


@pytest.fixture(scope="module", params=list(FAMILY))
def qwen_run(request, tmp_path_factory):
    """A tiny Qwen2.5-VL (with the releases' 112 px attention windows) or Qwen3-VL (DeepStack after its first
    block), aligned and LoRA-tuned a few steps: (run, images, data folder, family)."""
    from qilin_lite.demo.qwen_vl import build_tiny_qwen2_5_vl, build_tiny_qwen3_vl

    root = tmp_path_factory.mktemp("qwen_gguf")
    if request.param == "qwen2.5-vl":
        base = build_tiny_qwen2_5_vl(root / "base", TEXTS * 30, window_size=112)
    else:
        base = build_tiny_qwen3_vl(root / "base", TEXTS * 30)
    tune, images = smooth_image_run(root, base, TEXTS, SIZES, seed=5)
    return tune, images, root, request.param


@pytest.fixture(scope="module")
def exported(qwen_run, tmp_path_factory):
    from qilin_lite.export.cli import export_gguf

    return export_gguf(qwen_run[0], tmp_path_factory.mktemp("qwen_gguf_out") / "export")


def _field(reader, key):
    return reader.fields[key].contents()


def test_files_are_llama_cpps_pair(exported, qwen_run):
    import gguf

    fam = FAMILY[qwen_run[3]]
    llm, proj = gguf.GGUFReader(str(exported.model)), gguf.GGUFReader(str(exported.mmproj))
    assert _field(llm, "general.architecture") == fam["arch"]
    assert _field(llm, f"{fam['arch']}.rope.dimension_sections") == [4, 6, 6, 0]  # the tiny's mrope_section, padded
    assert _field(proj, "clip.projector_type") == fam["projector"]
    names = {t.name for t in proj.tensors}
    assert {"v.patch_embd.weight", "v.patch_embd.weight.1", "v.post_ln.weight", "mm.0.weight", "mm.2.bias",
            *fam["tensors"]} <= names, sorted(names)
    if qwen_run[3] == "qwen3-vl":
        assert _field(llm, "qwen3vl.n_deepstack_layers") == 1
        assert {t.name for t in llm.tensors} >= {"blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight"}
    assert exported.modelfile is None and exported.image_tokens == (4, 64)
    text = exported.readme.read_text(encoding="utf-8")
    assert "--image-min-tokens 4 --image-max-tokens 64" in text and "not a diagnosis" in text


def test_a_window_llama_cpp_does_not_run_is_refused_before_any_work(tmp_path):
    from qilin_lite.demo.qwen_vl import build_tiny_qwen2_5_vl
    from qilin_lite.export.gguf_qwen_vl import check_exportable

    d = build_tiny_qwen2_5_vl(tmp_path / "m", TEXTS * 10, window_size=56)
    with pytest.raises(UserError, match="window_size 56 px; llama.cpp attends in 112 px windows"):
        check_exportable(json.loads((d / "config.json").read_text(encoding="utf-8")), d)


def test_a_qwen3_vl_llama_cpp_would_run_otherwise_is_refused(tmp_path):
    from qilin_lite.demo.qwen_vl import build_tiny_qwen3_vl
    from qilin_lite.export.gguf_qwen_vl import check_exportable

    d = build_tiny_qwen3_vl(tmp_path / "m", TEXTS * 10)
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    check_exportable(cfg, d)  # the tiny release as it is: exportable
    flat = json.loads(json.dumps(cfg))
    flat["text_config"]["rope_parameters"]["mrope_interleaved"] = False
    with pytest.raises(UserError, match="not Qwen3-VL's interleaved M-RoPE"):
        check_exportable(flat, d)
    odd = json.loads(json.dumps(cfg))
    odd["vision_config"]["num_position_embeddings"] = 200
    with pytest.raises(UserError, match="not a square grid"):
        check_exportable(odd, d)


def test_pixel_bounds_between_two_token_counts_are_refused():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from qilin_lite.export.gguf_qwen_vl import image_token_limits

    assert image_token_limits(Qwen2VLImageProcessorPil(min_pixels=256 * 784, max_pixels=1280 * 784)) == (256, 1280)
    with pytest.raises(UserError, match="not whole multiples of 784"):
        image_token_limits(Qwen2VLImageProcessorPil(min_pixels=3000, max_pixels=1280 * 784))


def _llama(exported):
    pytest.importorskip("llama_cpp", reason="llama.cpp not built here (scripts/llama-cpp.sh needs a C++ compiler)")
    from benchmarks.harness.llama_cpp import LlamaCppLlava

    return LlamaCppLlava(exported.model, exported.mmproj, image_tokens=exported.image_tokens)


@pytest.fixture(scope="module")
def served_images(qwen_run, tmp_path_factory):
    """Each image as `qilin-lite image --model RUN` writes it for a server: at the processor's grid."""
    from qilin_lite.serve.image_file import prepare_image

    out = tmp_path_factory.mktemp("served")
    return [prepare_image(png, out / png.name, model=str(qwen_run[0])) for png in qwen_run[1]]


def test_the_served_image_is_at_the_grid_and_gives_trainings_pixels(qwen_run, served_images):
    """llama.cpp keeps a Qwen image's aspect and pads it to the grid, where Qwen's processor stretches it: an
    image written at the grid is resized by neither, and the processor gives the original's pixel values for it."""
    import torch
    from PIL import Image

    from qilin_lite.serve.generate import load_generator

    gen, _ = load_generator(str(qwen_run[0]), dtype="float32", temperature=0.0)
    for png, served in zip(qwen_run[1], served_images):
        size = Image.open(served).size
        unit = FAMILY[qwen_run[3]]["unit"]
        assert size[0] % unit == 0 and size[1] % unit == 0, size
        a = gen.images.inputs([gen.images.open(str(png))])
        b = gen.images.inputs([gen.images.open(str(served))])
        assert torch.equal(a["image_grid_thw"], b["image_grid_thw"])
        assert torch.equal(a["pixel_values"], b["pixel_values"]), png.name


def test_image_features_at_each_size_equal_the_trained_model(exported, qwen_run, served_images, tmp_path):
    """mtmd's embedding of each image = the merged model's vision tower + merger on the processor's pixels, to f16
    precision: the same grid (llama.cpp held to the run's token bounds), the same windows, the same values."""
    import torch

    from qilin_lite.merge import merge_run
    from qilin_lite.serve.generate import load_generator

    m = _llama(exported)
    gen, _ = load_generator(str(merge_run(qwen_run[0], tmp_path / "merged")), dtype="float32", temperature=0.0)
    try:
        for png, served in zip(qwen_run[1], served_images):
            vision = gen.images.inputs([gen.images.open(str(png))])  # chat's pixels and grid for this image
            with torch.no_grad():
                want = gen.model.get_image_features(pixel_values=vision["pixel_values"],
                                                    image_grid_thw=vision["image_grid_thw"])
            # per image token: the merger's output, then (Qwen3-VL) each DeepStack merger's, as llama.cpp lays them
            parts = [torch.cat(list(want.pooler_output))]
            parts += [torch.cat(list(f)) for f in getattr(want, "deepstack_features", None) or ()]
            want = torch.cat(parts, dim=-1).numpy()
            got = m.image_embedding(served)
            assert got.shape == want.shape, (png.name, got.shape, want.shape)
            scale = np.abs(want).max()
            assert np.abs(got - want).max() < 0.02 * scale, (png.name, np.abs(got - want).max(), scale)
    finally:
        m.close()


def test_llama_cpp_prompts_and_answers_as_chat_does(exported, qwen_run, served_images):
    """For images of every size: the prompt ids llama.cpp builds from the GGUF's template (the image where
    llama-mtmd-cli puts it) are chat's, image positions included, and the greedy answers are chat's."""
    from qilin_lite.serve.generate import load_generator

    gen, _ = load_generator(str(qwen_run[0]), dtype="float32", max_new_tokens=12, temperature=0.0)
    pad = gen.layout.image_token_id
    m = _llama(exported)
    try:
        agree = []
        for png, served in zip(qwen_run[1], served_images):
            for q in (QUESTION, "  请描述图像。 "):
                turn = [{"role": "user", "content": "<image>\n" + q}]
                want = gen.prompt_ids(turn, gen.images.counts([gen.images.open(str(png))])).tolist()
                a = m.answer(served, q, max_new_tokens=12)
                got = [pad if t is None else t for t in a["prompt_ids"]]
                assert got == want, (png.name, q)
                ours = gen.generate([turn], [[str(png)]])[0].strip()
                agree.append(a["text"] == ours)
        assert np.mean(agree) >= 0.9, agree
    finally:
        m.close()


def test_the_command_line_prints_llama_cpps_image_flags(qwen_run, tmp_path, monkeypatch, capsys):
    code, out, _ = run_cli_captured(monkeypatch, capsys, "export", "gguf", qwen_run[0], tmp_path / "cli")
    assert code == 0, out
    assert "--image-min-tokens 4 --image-max-tokens 64" in out and "Modelfile" not in out


def test_a_quantized_export_runs_in_llama_cpp_with_chats_prompt(qwen_run, served_images, tmp_path):
    import gguf

    from qilin_lite.export.cli import export_gguf
    from qilin_lite.serve.generate import load_generator

    pytest.importorskip("llama_cpp", reason="llama.cpp not built here (scripts/llama-cpp.sh needs a C++ compiler)")
    done = export_gguf(qwen_run[0], tmp_path / "q8", quant="q8_0")
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(str(done.model)).tensors}
    assert "Q8_0" in kinds, kinds
    gen, _ = load_generator(str(qwen_run[0]), dtype="float32", temperature=0.0)
    turn = [{"role": "user", "content": "<image>\n" + QUESTION}]
    want = gen.prompt_ids(turn, gen.images.counts([gen.images.open(str(qwen_run[1][2]))])).tolist()
    m = _llama(done)
    try:
        a = m.answer(served_images[2], QUESTION, max_new_tokens=4)
    finally:
        m.close()
    assert [gen.layout.image_token_id if t is None else t for t in a["prompt_ids"]] == want
    assert a["new_tokens"] > 0


# ---------------------------------------------------------------- llama-server on the Qwen2.5-VL export


@pytest.fixture(scope="module")
def qwen_server(exported, tmp_path_factory):
    from conftest import llama_server_on

    lo, hi = exported.image_tokens
    with llama_server_on(exported.model, exported.mmproj, tmp_path_factory.mktemp("qwen-server") / "server.log",
                         "--image-min-tokens", str(lo), "--image-max-tokens", str(hi)) as url:
        yield url


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.mark.slow
@pytest.mark.parametrize("messages, trained", [
    ([{"role": "user", "content": [IMAGE, {"type": "text", "text": " 病灶位于哪一侧？ "}]}],
     [{"role": "user", "content": "<image>\n病灶位于哪一侧？"}]),
    ([{"role": "user", "content": [IMAGE, {"type": "text", "text": "请描述图像。"}]},
      {"role": "assistant", "content": "心影大小正常。"},
      {"role": "user", "content": [{"type": "text", "text": "对比这张："}, IMAGE]}],
     [{"role": "user", "content": "<image>\n请描述图像。"}, {"role": "assistant", "content": "心影大小正常。"},
      {"role": "user", "content": "对比这张：<image>"}]),
    ([{"role": "system", "content": "你是放射科医生。"}, {"role": "user", "content": " 病灶\u00a0在\u3000哪？\n"}],
     [{"role": "system", "content": "你是放射科医生。"}, {"role": "user", "content": " 病灶\u00a0在\u3000哪？\n"}]),
], ids=["first-turn", "second-image-later-turn", "system-and-inner-unicode-spaces"])
def test_llama_server_renders_and_tokenizes_chats_prompt(qwen_server, qwen_run, messages, trained):
    """llama-server's own Jinja over the GGUF's template (its random media marker for each image part) renders
    training's prompt; its tokenization of the text around the images is chat's ids."""
    import re

    from qilin_lite.serve.generate import load_generator

    gen, _ = load_generator(str(qwen_run[0]), dtype="float32", temperature=0.0)
    t = gen.template
    got = post_json(f"{qwen_server}/apply-template", {"messages": messages})["prompt"]
    markers = set(re.findall(r"<__media_[A-Za-z0-9]{8,}__>", got))
    assert len(markers) == (1 if any(isinstance(m["content"], list) for m in messages) else 0), got
    text = got.replace(next(iter(markers)), t.image_text) if markers else got
    assert text == t.render(t.place_images(trained), add_generation_prompt=True).text
    if not markers:  # text only: the server's ids are chat's
        ids = post_json(f"{qwen_server}/tokenize", {"content": got, "add_special": True, "parse_special": True})["tokens"]
        assert ids == gen.prompt_ids(trained).tolist()


@pytest.mark.slow
def test_llama_server_keeps_non_ascii_space_at_a_turns_ends(qwen_server):
    """The one difference found: qwen-vl-finetune strips each text piece with Python's `str.strip`, which removes
    U+3000 / U+00A0 too, and so do training and chat; llama.cpp's Jinja `strip` removes ASCII whitespace only (byte by
    byte, so it cannot be given the Unicode ones), so a turn that starts or ends with them keeps them when served
    (README says so). If llama.cpp changes, this test says the difference is gone."""
    got = post_json(f"{qwen_server}/apply-template",
                {"messages": [{"role": "user", "content": "\u3000病灶在哪？\u00a0"}]})["prompt"]
    assert "user\n\u3000病灶在哪？\u00a0<|im_end|>" in got, got


@pytest.mark.slow
def test_eval_endpoint_through_llama_server_answers_as_in_process_eval(qwen_server, exported, qwen_run, tmp_path):
    """`eval --endpoint` on the served export, images sent as the run saw them (`--images-as`: at the processor's
    grid): the same answers as `eval --model` on the run."""
    from conftest import served_answers_as_eval

    run, _, root, _ = qwen_run
    local, served = served_answers_as_eval(qwen_server, exported.model.name, run, root, tmp_path)
    assert len(local) == len(served) == 10
    assert np.mean([a == b for a, b in zip(served, local)]) >= 0.9, list(zip(served, local))
