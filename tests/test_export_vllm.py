"""`qilin-lite export vllm`: a directory vLLM serves as it is, answering as `qilin-lite chat` does.

The fast tests check the export on the suite's tiny runs: the weight names are the ones vLLM's loaders read
(against the renaming table, and against names read in vLLM's own source), transformers still loads the export and
answers as chat does, the chat template is the run's with the BOS vLLM needs, and what cannot be exported is refused
in one line. The slow test serves the export with the real vLLM: set QILIN_VLLM_PYTHON to the python of a venv that
has vLLM (README, "Serve"; checked with vLLM 0.32.0's CPU build).
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import free_port, run_cli_captured, tiny_recipe
from safetensors import safe_open

from qilin_lite.errors import UserError
from qilin_lite.export import VLLM_LLAVA_KEYS, export_vllm, vllm_key
from qilin_lite.export.vllm import check_vllm_exportable

QUESTION = "病灶位于哪一侧？"

# The names vLLM 0.32.0 loads a Llava checkpoint by, read in its source (vllm/model_executor/models/llava.py:
# LlavaForConditionalGeneration's modules `language_model` (the text model's own class: `model.*`, `lm_head`),
# `vision_tower` (clip.py's CLIPVisionModel, which keeps the tower under `vision_model`, and drops post_layernorm
# and the layers past the feature layer itself) and `multi_modal_projector` (linear_1, linear_2); its
# hf_to_vllm_mapper only moves transformers >= 4.52's `model.*` names to these). `vision_tower.embeddings...` is
# what it refused: "There is no module or parameter named 'vision_tower.embeddings' in LlavaForConditionalGeneration".
VLLM_LLAVA_PREFIXES = ("language_model.model.embed_tokens.", "language_model.model.layers.",
                       "language_model.model.norm.", "language_model.lm_head.",
                       "vision_tower.vision_model.embeddings.", "vision_tower.vision_model.pre_layrnorm.",
                       "vision_tower.vision_model.encoder.layers.", "vision_tower.vision_model.post_layernorm.",
                       "multi_modal_projector.linear_1.", "multi_modal_projector.linear_2.")
# vLLM 0.32.0's qwen2_5_vl.py maps the releases' names itself ("model." -> the text model, "visual.", "lm_head.")
VLLM_QWEN2_5_VL_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.", "visual.")


def _weights(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


@pytest.fixture(scope="module")
def merged(qlora_run, tmp_path_factory):
    from qilin_lite.merge import merge_run

    return merge_run(qlora_run, tmp_path_factory.mktemp("vllm") / "merged")


@pytest.fixture(scope="module")
def exported(qlora_run, tmp_path_factory):
    return export_vllm(qlora_run, tmp_path_factory.mktemp("vllm") / "export")


def test_weights_are_merge_output_under_vllm_names(merged, exported):
    ours, theirs = _weights(merged), _weights(exported)
    assert set(theirs) == {vllm_key(k) for k in ours}  # the table, applied to what merge wrote
    assert all(torch.equal(theirs[vllm_key(k)], v) for k, v in ours.items())
    assert all(k.startswith(VLLM_LLAVA_PREFIXES) for k in theirs), sorted(theirs)
    assert any(k.startswith("vision_tower.embeddings.") for k in ours)  # what vLLM refused in the merge output
    assert not any(k.startswith("vision_tower.embeddings.") for k in theirs)
    for prefix in VLLM_LLAVA_PREFIXES:  # every part is there
        assert any(k.startswith(prefix) for k in theirs), prefix
    assert oct(os.stat(exported / "model.safetensors").st_mode & 0o077) != "0o0"  # not safetensors' private mode


def test_renaming_table():
    assert vllm_key("vision_tower.embeddings.patch_embedding.weight") == \
        "vision_tower.vision_model.embeddings.patch_embedding.weight"
    assert vllm_key("vision_tower.vision_model.pre_layrnorm.bias") == "vision_tower.vision_model.pre_layrnorm.bias"
    # transformers >= 4.52's in-memory names land in the same layout
    assert vllm_key("model.vision_tower.encoder.layers.0.mlp.fc1.weight") == \
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert vllm_key("model.language_model.layers.0.self_attn.q_proj.weight") == \
        "language_model.model.layers.0.self_attn.q_proj.weight"
    assert vllm_key("lm_head.weight") == "language_model.lm_head.weight"
    assert vllm_key("model.multi_modal_projector.linear_2.bias") == "multi_modal_projector.linear_2.bias"
    # every name the table writes lies under one vLLM reads
    assert all(any(p.startswith(new) for p in VLLM_LLAVA_PREFIXES) for _, new in VLLM_LLAVA_KEYS)
    with pytest.raises(UserError, match="not a Llava weight name"):
        vllm_key("visual.blocks.0.attn.qkv.weight")


def test_transformers_loads_the_export_and_answers_as_chat(qlora_run, merged, exported, tiny_data):
    from transformers import LlavaForConditionalGeneration

    from qilin_lite.serve.generate import load_generator

    a = LlavaForConditionalGeneration.from_pretrained(str(merged), dtype=torch.float32).state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(str(exported), dtype=torch.float32).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the renamed names load as before

    image = sorted(Path(tiny_data["images"]).glob("*.png"))[0]
    turn = [{"role": "user", "content": "<image>\n" + QUESTION}]
    answers = []
    for d in (qlora_run, exported):
        gen, info = load_generator(str(d), dtype="float32", max_new_tokens=12, attn="sdpa", temperature=0.0)
        answers.append((gen.generate([turn], [[image]])[0], gen.last_prompt_ids, info.template, info.image_mode))
    assert answers[0] == answers[1]


def vllm_prompt_is_trained(run_dir: Path, export_dir: Path, add_special_tokens: bool) -> None:
    """vLLM's steps on the export (transformers' own tokenizer, the saved template rendered over OpenAI parts,
    tokenized with or without special tokens, each <image> expanded to the tower's count) give chat's prompt ids,
    on a first turn and on a second one."""
    from transformers import AutoConfig, AutoTokenizer

    from qilin_lite.encoding import prompt_ids
    from qilin_lite.families import get_template
    from qilin_lite.model import RunInfo, load_tokenizer, token_layout

    template = get_template(RunInfo.load(run_dir).template)
    hf, ours_tok = AutoTokenizer.from_pretrained(str(export_dir)), load_tokenizer(str(run_dir))
    layout = token_layout(AutoConfig.from_pretrained(str(export_dir)), max_length=10**9)
    image = [{"type": "image"}]
    cases = [([{"role": "user", "content": image + [{"type": "text", "text": QUESTION}]}],
              [{"role": "user", "content": "<image>\n" + QUESTION}]),
             ([{"role": "user", "content": image + [{"type": "text", "text": "描述图像。"}]},
               {"role": "assistant", "content": "正常。"}, {"role": "user", "content": QUESTION}],
              [{"role": "user", "content": "<image>\n描述图像。"}, {"role": "assistant", "content": "正常。"},
               {"role": "user", "content": QUESTION}])]
    for served, ours in cases:
        text = hf.apply_chat_template(served, tokenize=False, add_generation_prompt=True)
        ids = []
        for t in hf(text, add_special_tokens=add_special_tokens)["input_ids"]:
            ids += [t] * layout.num_image_tokens if t == layout.image_token_id else [t]
        assert ids == prompt_ids(ours, template, ours_tok, layout).tolist()


def test_chat_template_is_the_runs_and_requests_add_the_bos(qlora_run, exported):
    """The suite's tokenizer is a Metaspace BPE that puts its space before the first word only: after a `<s>` the
    template wrote it would split that word otherwise, so the template stays the run's and requests add the BOS."""
    from qilin_lite.families import get_template
    from qilin_lite.model import RunInfo

    saved = (exported / "chat_template.jinja").read_text(encoding="utf-8")
    assert saved == (qlora_run / "chat_template.jinja").read_text(encoding="utf-8")
    assert saved == get_template(RunInfo.load(qlora_run).template).chat_template_jinja()
    vllm_prompt_is_trained(qlora_run, exported, add_special_tokens=True)
    assert '"add_special_tokens": true' in (exported / "README.md").read_text(encoding="utf-8")
    config = json.loads((exported / "generation_config.json").read_text(encoding="utf-8"))
    assert config["eos_token_id"] == 2  # </s>, chat's one end token for vicuna_v1


def test_a_sentencepiece_run_gets_the_bos_in_its_template(wide_tune, tmp_path):
    """LLaMA's SentencePiece tokenizer (the paper's) reads a `<s>` in the text as the BOS: the template writes it,
    and vLLM's default request (no special tokens) gets training's prompt."""
    run = wide_tune("sentencepiece")
    out = export_vllm(run, tmp_path / "out")
    saved = (out / "chat_template.jinja").read_text(encoding="utf-8")
    assert saved == "{{ bos_token }}" + (run / "chat_template.jinja").read_text(encoding="utf-8")
    vllm_prompt_is_trained(run, out, add_special_tokens=False)
    assert "add_special_tokens" not in (out / "README.md").read_text(encoding="utf-8")


def test_a_full_run_exports_without_a_merge(full_run, tmp_path):
    out = export_vllm(full_run, tmp_path / "out")
    theirs = _weights(out)
    assert set(theirs) == {vllm_key(k) for k in _weights(full_run)}
    assert all(k.startswith(VLLM_LLAVA_PREFIXES) for k in theirs)
    assert json.loads((out / "qilin.json").read_text(encoding="utf-8"))["kind"] == "merged"
    assert not list(out.glob(".export-*"))


def test_align_run_is_refused_in_one_line(align_run, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli_captured(monkeypatch, capsys, "export", "vllm", align_run, tmp_path / "out")
    assert code == 2 and "'plain' template" in err and "export a tune run" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_non_empty_out_dir_is_never_overwritten(qlora_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli_captured(monkeypatch, capsys, "export", "vllm", qlora_run, out)
    assert code == 2 and "already exists and is not empty" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, err = run_cli_captured(monkeypatch, capsys, "export", "vllm", tmp_path, tmp_path / "new")
    assert code == 2 and "no qilin.json" in err and len(err.strip().splitlines()) == 1


def test_the_cli_writes_the_export(qlora_run, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli_captured(monkeypatch, capsys, "export", "vllm", qlora_run, tmp_path / "out")
    assert code == 0, err
    assert f"exported: {tmp_path / 'out'}" in out and "vllm.entrypoints.openai.api_server" in out
    assert (tmp_path / "out" / "processor_config.json").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.mark.parametrize("config, message", [
    ({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}, "gemma3 family is not checked"),
    ({"model_type": "qwen3_vl", "architectures": ["Qwen3VLForConditionalGeneration"]},
     "qwen3-vl family is not checked"),
    ({"model_type": "llava", "vision_config": {"model_type": "pixtral"}}, "its vision tower is 'pixtral'"),
])
def test_families_vllm_was_not_checked_with_are_refused(config, message, tmp_path):
    with pytest.raises(UserError, match=message) as e:
        check_vllm_exportable(config, tmp_path)
    assert "\n" not in str(e.value)


def test_families_vllm_loads_are_accepted(tmp_path):
    assert check_vllm_exportable({"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"}},
                                 tmp_path) is vllm_key
    assert check_vllm_exportable({"model_type": "llava", "vision_config": {"model_type": "siglip_vision_model"}},
                                 tmp_path) is vllm_key
    assert check_vllm_exportable({"model_type": "qwen2_5_vl"}, tmp_path) is None  # names as merge wrote them


# --- Qwen2.5-VL: merge's names are the ones vLLM maps --------------------------------------------------------------

QWEN_TEXTS = ["胸部X光片显示双肺纹理清晰，未见明显异常。", "这张CT图像中病灶位于哪里？", "左肺上叶可见结节影。",
              "请描述图像。", "心影大小正常。", QUESTION]


@pytest.fixture(scope="module")
def qwen_tune(tmp_path_factory):
    """A tiny Qwen2.5-VL (head_dim 32: vLLM's CPU attention takes 32 and up), aligned and LoRA-tuned a few steps."""
    from PIL import Image

    from qilin_lite.demo.qwen_vl import build_tiny_qwen2_5_vl
    from qilin_lite.train.stage import train_stage

    root = tmp_path_factory.mktemp("qwen_vllm")
    base = build_tiny_qwen2_5_vl(root / "base", QWEN_TEXTS * 30)
    (root / "img").mkdir()
    rng, rows = random.Random(3), []
    for i in range(8):
        Image.new("RGB", (112, 112), (30 * i, 200 - 20 * i, 90)).save(root / "img" / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(QWEN_TEXTS)},
            {"from": "gpt", "value": rng.choice(QWEN_TEXTS)}]})
    (root / "train.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    align, _ = train_stage(tiny_recipe("align", "align", root / "align", root / "train.json", root / "img",
                                       **{"model.base": str(base)}))
    tune, _ = train_stage(tiny_recipe("tune", "lora", root / "tune", root / "train.json", root / "img",
                                      **{"model.from_run": str(align)}))
    return tune, root / "img" / "3.png"


@pytest.fixture(scope="module")
def qwen_export(qwen_tune, tmp_path_factory):
    return export_vllm(qwen_tune[0], tmp_path_factory.mktemp("qwen_vllm_out") / "export")


def test_qwen2_5_vl_exports_merge_names_unchanged(qwen_tune, qwen_export, tmp_path):
    from qilin_lite.merge import merge_run
    from qilin_lite.serve.generate import load_generator

    ours = _weights(merge_run(qwen_tune[0], tmp_path / "merged"))
    theirs = _weights(qwen_export)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(k.startswith(VLLM_QWEN2_5_VL_PREFIXES) for k in theirs), sorted(theirs)
    # no BOS in Qwen's prompt: the template is the run's as it is; chat's end tokens in the generation config
    assert (qwen_export / "chat_template.jinja").read_text(encoding="utf-8") == \
        (qwen_tune[0] / "chat_template.jinja").read_text(encoding="utf-8")
    gen, _ = load_generator(str(qwen_export), dtype="float32", max_new_tokens=4, temperature=0.0)
    stops = json.loads((qwen_export / "generation_config.json").read_text(encoding="utf-8"))["eos_token_id"]
    assert sorted(stops if isinstance(stops, list) else [stops]) == sorted(gen.stop_ids())
    turn = [{"role": "user", "content": "<image>\n" + QUESTION}]
    run_gen, _ = load_generator(str(qwen_tune[0]), dtype="float32", max_new_tokens=4, temperature=0.0)
    assert gen.generate([turn], [[qwen_tune[1]]]) == run_gen.generate([turn], [[qwen_tune[1]]])


# --- the real vLLM ---------------------------------------------------------------------------------------------------

VLLM_PYTHON = os.environ.get("QILIN_VLLM_PYTHON")
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON, reason="set QILIN_VLLM_PYTHON to the python of a venv with vLLM "
                                "(README, 'Serve') to serve the export with it")


@pytest.fixture(scope="module")
def wide_tune(tmp_path_factory, tiny_data):
    """tokenizer ("sentencepiece" | "bpe") -> a tiny Llava whose LLM heads are 32 wide (hidden 128, 4 heads: vLLM's
    CPU attention refuses narrower ones, the suite's tiny base has 16), built, aligned and QLoRA-tuned as the suite's
    runs are; each built once."""
    from qilin_lite.demo.base import TinySpec, build_tiny_base
    from qilin_lite.demo.data import CHOICES, QUESTIONS, DemoDataSpec, demo_texts
    from qilin_lite.model import assemble_base
    from qilin_lite.train.stage import train_stage

    built: dict[str, Path] = {}

    def build(tokenizer: str) -> Path:
        if tokenizer not in built:
            root = tmp_path_factory.mktemp(f"wide-{tokenizer}")
            spec = DemoDataSpec(image_size=32)
            questions = [(q, list(CHOICES[t])) for t in spec.tasks for q in QUESTIONS[t]]
            vision, llm = build_tiny_base(root / "parts", demo_texts(spec), questions,
                                          TinySpec(image_size=32, hidden=128, heads=4, pretrain_steps=20,
                                                   tokenizer=tokenizer))
            base = assemble_base(str(vision), str(llm), root / "base", dtype="float32")
            align, _ = train_stage(tiny_recipe("align", "align", root / "align", tiny_data["align"],
                                               tiny_data["images"], **{"model.base": str(base)}))
            built[tokenizer], _ = train_stage(tiny_recipe("tune", "qlora", root / "tune", tiny_data["tune"],
                                                          tiny_data["images"], **{"model.from_run": str(align)}))
        return built[tokenizer]

    return build


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def vllm_answers_like_chat(model_dir: Path, image: Path, question: str, log: Path) -> None:
    """vLLM's OpenAI server on MODEL_DIR answers an image question (an image_url data URL + text) with chat's
    prompt token count and greedy answer (token for token), sending `add_special_tokens` where the export's
    README says to."""
    from qilin_lite.serve.generate import load_generator

    gen, _ = load_generator(str(model_dir), dtype="float32", max_new_tokens=12, attn="sdpa", temperature=0.0)
    turn = [{"role": "user", "content": "<image>\n" + question}]
    greedy = gen.generate([turn], [[image]])[0]
    prompt = torch.tensor([gen.last_prompt_ids])
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt),
              **gen.images.inputs([gen.images.open(image)])}
    if gen.layout.marks:
        inputs[gen.layout.marks] = (prompt == gen.layout.image_token_id).long()
    ids = gen.model.generate(**inputs, do_sample=False, max_new_tokens=12, eos_token_id=gen.stop_ids(),
                             pad_token_id=gen.tokenizer.pad_token_id, **dict(gen.template.generation))
    ids = ids[0, prompt.shape[1]:].tolist()

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")  # 1 GiB of KV cache, not most of RAM
    with log.open("w") as f:
        server = subprocess.Popen([VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                                   "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024",
                                   "--dtype", "float32"], stdout=f, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    try:
        deadline = time.time() + 300  # 50-90 s on 2 cores
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(2)
        url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": question}]}]
        body = {"model": str(model_dir), "max_tokens": 12, "temperature": 0, "messages": messages,
                "return_token_ids": True}
        if '"add_special_tokens": true' in (model_dir / "README.md").read_text(encoding="utf-8"):
            body["add_special_tokens"] = True
        reply = _post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
    finally:
        os.killpg(server.pid, 15)  # the API server, its engine core and worker: one process group
        server.wait(timeout=60)
    choice = reply["choices"][0]
    assert reply["usage"]["prompt_tokens"] == prompt.shape[1]  # the same prompt, image tokens included
    assert choice["token_ids"] == ids
    if "\ufffd" not in greedy:  # vLLM holds back a trailing piece of a UTF-8 character; transformers shows U+FFFD
        assert choice["message"]["content"].strip() == greedy


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("tokenizer", ["sentencepiece", "bpe"])  # the BOS in the template; asked for per request
def test_vllm_serves_the_llava_export_as_chat_answers(wide_tune, tokenizer, tiny_data, tmp_path):
    out = export_vllm(wide_tune(tokenizer), tmp_path / "export")
    image = sorted(Path(tiny_data["images"]).glob("*.png"))[0]  # square: no pad-vs-crop difference (README)
    vllm_answers_like_chat(out, image, QUESTION, tmp_path / "vllm.log")


@pytest.mark.slow
@needs_vllm
def test_vllm_serves_the_qwen2_5_vl_export_as_chat_answers(qwen_tune, qwen_export, tmp_path):
    vllm_answers_like_chat(qwen_export, qwen_tune[1], QUESTION, tmp_path / "vllm.log")
