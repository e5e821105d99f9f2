"""`export gguf` for Gemma 3 (MedGemma): llama.cpp's gemma3 LLM + a gemma3 mmproj, run in llama.cpp itself
(llama-cpp-python's libllama + libmtmd, scripts/llama-cpp.sh; llama-server, scripts/llama-server.sh): image features
equal the trained model's, prompt ids and greedy answers equal chat's, llama-server renders and tokenizes chat's
prompt.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from qilin_lite.errors import UserError

QUESTION = "病灶位于哪一侧？"
TEXTS = ["胸部X光片显示双肺纹理清晰，未见明显异常。", "这张CT图像中病灶位于哪里？", "左肺上叶可见结节影。",
         "请描述图像。", "心影大小正常。", QUESTION, "病灶 位于 左侧", "没有 异常"]
SIZES = [(28, 28), (64, 40), (100, 180), (300, 90)]


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory):
    """A tiny Gemma 3 with a SentencePiece tokenizer.model (as the releases ship), aligned and LoRA-tuned a few
    steps: (run, images, data folder)."""
    from conftest import smooth_image_run

    from qilin_lite.demo.gemma3 import build_tiny_gemma3

    root = tmp_path_factory.mktemp("gemma_gguf")
    base = build_tiny_gemma3(root / "base", TEXTS * 30, sentencepiece=True)
    tune, images = smooth_image_run(root, base, TEXTS, SIZES, seed=7)
    return tune, images, root


@pytest.fixture(scope="module")
def exported(gemma_run, tmp_path_factory):
    from qilin_lite.export.cli import export_gguf

    return export_gguf(gemma_run[0], tmp_path_factory.mktemp("gemma_gguf_out") / "export")


def test_files_are_llama_cpps_gemma3_pair(exported):
    import gguf

    llm, proj = gguf.GGUFReader(str(exported.model)), gguf.GGUFReader(str(exported.mmproj))
    assert llm.fields["general.architecture"].contents() == "gemma3"
    assert llm.fields["gemma3.attention.sliding_window_pattern"].contents() == [True, False]  # the tiny's layers
    assert llm.fields["tokenizer.ggml.model"].contents() == "llama"
    assert proj.fields["clip.projector_type"].contents() == "gemma3"
    assert {"mm.input_projection.weight", "mm.soft_emb_norm.weight", "v.post_ln.bias"} <= {t.name for t in proj.tensors}
    assert exported.modelfile is None and "not a diagnosis" in exported.readme.read_text(encoding="utf-8")


def test_norms_are_written_plus_one(exported, gemma_run, tmp_path):
    """Gemma's RMSNorm scales by 1 + weight, llama.cpp's by the weight: the file holds weight + 1."""
    import gguf
    import torch

    from qilin_lite.merge import merge_run
    from qilin_lite.serve.generate import load_generator

    gen, _ = load_generator(str(merge_run(gemma_run[0], tmp_path / "m")), dtype="float32", temperature=0.0)
    want = gen.model.model.language_model.layers[0].post_feedforward_layernorm.weight.detach().float() + 1
    t = next(t for t in gguf.GGUFReader(str(exported.model)).tensors if t.name == "blk.0.post_ffw_norm.weight")
    assert torch.allclose(torch.from_numpy(np.array(t.data, dtype=np.float32)), want, atol=1e-6)


def test_a_gemma_without_tokenizer_model_is_refused_before_any_work(tmp_path):
    from qilin_lite.demo.gemma3 import build_tiny_gemma3
    from qilin_lite.export.gguf_gemma3 import check_exportable

    d = build_tiny_gemma3(tmp_path / "m", TEXTS * 10)  # tokenizer.json only
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    with pytest.raises(UserError, match="no SentencePiece tokenizer.model"):
        check_exportable(cfg, d, (d,))
    cfg["text_config"]["query_pre_attn_scalar"] = 7
    (d / "tokenizer.model").write_bytes(b"")
    with pytest.raises(UserError, match="query_pre_attn_scalar 7"):
        check_exportable(cfg, d, (d,))


@pytest.fixture(scope="module")
def served_images(gemma_run, tmp_path_factory):
    """Each image as `qilin-lite image --model RUN` writes it for a server: squashed to the tower's size, as the
    processor squashes it (llama.cpp would keep its aspect and pad it with black)."""
    from qilin_lite.serve.image_file import prepare_image

    out = tmp_path_factory.mktemp("served")
    return [prepare_image(png, out / png.name, model=str(gemma_run[0])) for png in gemma_run[1]]


def test_the_served_image_gives_trainings_pixels(gemma_run, served_images):
    import torch
    from PIL import Image

    from qilin_lite.serve.generate import load_generator

    gen, _ = load_generator(str(gemma_run[0]), dtype="float32", temperature=0.0)
    for png, served in zip(gemma_run[1], served_images):
        assert Image.open(served).size == (28, 28)
        a = gen.images.inputs([gen.images.open(str(png))])["pixel_values"]
        b = gen.images.inputs([gen.images.open(str(served))])["pixel_values"]
        assert torch.equal(a, b), png.name


def _llama(exported):
    pytest.importorskip("llama_cpp", reason="llama.cpp not built here (scripts/llama-cpp.sh needs a C++ compiler)")
    from benchmarks.harness.llama_cpp import LlamaCppLlava

    return LlamaCppLlava(exported.model, exported.mmproj)


def test_image_features_equal_the_trained_model(exported, gemma_run, served_images, tmp_path):
    """mtmd's embedding of each image (squashed to the tower's size, pooled, projected) = the merged model's, to
    f16 precision, for images of every aspect."""
    import torch

    from qilin_lite.merge import merge_run
    from qilin_lite.serve.generate import load_generator

    m = _llama(exported)
    gen, _ = load_generator(str(merge_run(gemma_run[0], tmp_path / "merged")), dtype="float32", temperature=0.0)
    try:
        for png, served in zip(gemma_run[1], served_images):
            vision = gen.images.inputs([gen.images.open(str(png))])
            with torch.no_grad():
                want = gen.model.get_image_features(pixel_values=vision["pixel_values"])
            want = getattr(want, "pooler_output", want)
            want = (want[0] if isinstance(want, (list, tuple)) else want).reshape(-1, want.shape[-1] if not isinstance(
                want, (list, tuple)) else want[0].shape[-1]).numpy()
            got = m.image_embedding(served)
            assert got.shape == want.shape, (png.name, got.shape, want.shape)
            scale = np.abs(want).max()
            assert np.abs(got - want).max() < 0.02 * scale, (png.name, np.abs(got - want).max(), scale)
    finally:
        m.close()


def test_llama_cpp_prompts_and_answers_as_chat_does(exported, gemma_run, served_images):
    from qilin_lite.serve.generate import load_generator

    gen, _ = load_generator(str(gemma_run[0]), dtype="float32", max_new_tokens=12, temperature=0.0)
    pad = gen.layout.image_token_id
    m = _llama(exported)
    try:
        agree, spoken = [], []
        for png, served in zip(gemma_run[1], served_images):
            for q in (QUESTION, " 请描述图像。 "):
                turn = [{"role": "user", "content": "<image>\n" + q}]
                want = gen.prompt_ids(turn, gen.images.counts([gen.images.open(str(png))])).tolist()
                a = m.answer(served, q, max_new_tokens=12)
                # mtmd puts <start_of_image> / <end_of_image> around the image's positions itself
                got = [pad if t is None else t for t in a["prompt_ids"]]
                assert got == want, (png.name, q, got, want)
                ours = gen.generate([turn], [[str(png)]])[0].strip()
                agree.append(a["text"] == ours)
                spoken.append(bool(ours))
        assert np.mean(agree) >= 0.9, agree
        assert sum(spoken) >= 2, spoken  # not only answers that end at once
    finally:
        m.close()


# ---------------------------------------------------------------- llama-server on the Gemma 3 export


@pytest.fixture(scope="module")
def gemma_server(exported, tmp_path_factory):
    from conftest import llama_server_on

    with llama_server_on(exported.model, exported.mmproj, tmp_path_factory.mktemp("gemma-server") / "s.log") as url:
        yield url


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.mark.slow
@pytest.mark.parametrize("messages, trained", [
    ([{"role": "user", "content": [IMAGE, {"type": "text", "text": " 病灶位于哪一侧？ "}]}],
     [{"role": "user", "content": "<image>\n病灶位于哪一侧？"}]),
    ([{"role": "system", "content": "你是放射科医生。"},
      {"role": "user", "content": [IMAGE, {"type": "text", "text": "请描述图像。"}]},
      {"role": "assistant", "content": "心影大小正常。"}, {"role": "user", "content": "左肺呢？"}],
     [{"role": "system", "content": "你是放射科医生。"}, {"role": "user", "content": "<image>\n请描述图像。"},
      {"role": "assistant", "content": "心影大小正常。"}, {"role": "user", "content": "左肺呢？"}]),
    ([{"role": "user", "content": "病灶 位于 左侧\u00a0吗？"}], [{"role": "user", "content": "病灶 位于 左侧\u00a0吗？"}]),
], ids=["first-turn", "system-image-later-turn", "text-only"])
def test_llama_server_renders_and_tokenizes_chats_prompt(gemma_server, gemma_run, messages, trained):
    """llama-server's own Jinja over the GGUF's template renders what Gemma3Processor tokenizes (its media marker
    where `<start_of_image>` ... `<end_of_image>` go, mtmd adding those two); a text turn's ids are chat's."""
    import re

    from conftest import post_json

    from qilin_lite.families.gemma3 import BOI, EOI, SOFT
    from qilin_lite.serve.generate import load_generator

    gen, _ = load_generator(str(gemma_run[0]), dtype="float32", temperature=0.0)
    t = gen.template
    got = post_json(f"{gemma_server}/apply-template", {"messages": messages})["prompt"]
    markers = set(re.findall(r"<__media_[A-Za-z0-9]{8,}__>", got))
    text = got.replace(next(iter(markers)), BOI + SOFT + EOI) if markers else got
    want = t.expanded(t.render(t.place_images(trained), add_generation_prompt=True)).text
    assert "<bos>" + text == want, (got, want)
    if not markers:
        ids = post_json(f"{gemma_server}/tokenize", {"content": got, "add_special": True, "parse_special": True})
        assert ids["tokens"] == gen.prompt_ids(trained).tolist()


@pytest.mark.slow
def test_eval_endpoint_through_llama_server_answers_as_in_process_eval(gemma_server, exported, gemma_run, tmp_path):
    from conftest import served_answers_as_eval

    run, _, root = gemma_run
    local, served = served_answers_as_eval(gemma_server, exported.model.name, run, root, tmp_path)
    assert len(local) == len(served) == 8

    def valid(x: str) -> str:
        # the random tiny model samples byte-fallback pieces that are no UTF-8; transformers decodes each bad byte
        # as U+FFFD, llama-server drops some and shows others as '~': compare what both decode as text
        return x.replace("\ufffd", "").replace("~", "")

    assert np.mean([valid(a) == valid(b) for a, b in zip(served, local)]) >= 0.9, list(zip(served, local))
    assert any(valid(b) for b in local)  # some answer holds text to compare
