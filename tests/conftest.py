"""Shared tiny assets: a tiny CLIP + tiny LLaMA joined by the real `assemble_base`, a small synthetic dataset,
and short align / tune runs. Built once per test session, offline, on the CPU."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_recipe(stage: str, mode: str, out: Path, data: Path, images: Path, **extra):
    """A recipe small enough for a few CPU steps; `extra` are dotted overrides."""
    from qilin_lite.config import load_recipe

    fields = {
        "model.dtype": "float32", "model.attn": "sdpa", "data.max_length": 256, "data.num_workers": 0,
        "train.mode": mode, "train.global_batch": 4, "train.per_device_batch": 4, "train.lr": 1e-2,
        "train.max_steps": 2, "train.bf16": False, "train.tf32": False, "train.gradient_checkpointing": False,
        "train.save_steps": 1000, "train.logging_steps": 1, "train.lora_r": 4, "train.lora_alpha": 8,
        "data.train": str(data), "data.image_folder": str(images),
    }
    fields.update(extra)
    return load_recipe(None, None, stage=stage, output_dir=str(out), **fields)


def run_cli(args: list[str], monkeypatch) -> int:
    """The console script's `main` in this process (no interpreter start-up); returns the exit code."""
    import sys

    from qilin_lite.cli import main

    monkeypatch.setattr(sys, "argv", ["qilin-lite", *args])
    try:
        main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    return 0


def run_cli_captured(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`run_cli` plus what the command printed: (exit code, stdout, stderr)."""
    code = run_cli([str(a) for a in args], monkeypatch)
    out = capsys.readouterr()
    return code, out.out, out.err


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (for servers and process groups the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reply_json(handler, obj) -> None:
    """Answer an http.server request with `obj` as JSON (status 200)."""
    import json

    data = json.dumps(obj).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def reply_chat_completion(handler, content: str) -> None:
    """Answer an http.server request as an OpenAI-compatible chat endpoint does (the fake translator and judge)."""
    reply_json(handler, {"choices": [{"message": {"role": "assistant", "content": content}}]})


@contextlib.contextmanager
def web_server(args: list, log: Path, open_files: int | None = None):
    """`qilin-lite web ARGS` on a free port of 127.0.0.1, its output in `log`; yields the port once it listens.
    `open_files`: the server's file limit (RLIMIT_NOFILE), to run out of descriptors sooner."""
    import os
    import resource
    import socket
    import subprocess
    import sys
    import time

    def limit():
        if open_files:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    port = free_port()
    with open(log, "w") as f:
        p = subprocess.Popen([str(Path(sys.executable).with_name("qilin-lite")), "web", "--port", str(port),
                              *map(str, args)], stdout=f, stderr=subprocess.STDOUT, preexec_fn=limit,
                             env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
        try:
            deadline = time.time() + 180
            while time.time() < deadline:
                if p.poll() is not None:
                    raise RuntimeError(log.read_text())
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.5)
            yield port
        finally:
            p.terminate()
            p.wait(timeout=30)


_MEMORY: dict = {}


@contextlib.contextmanager
def llama_server_on(model: Path, mmproj: Path, log: Path, *extra: str):
    """llama-server (scripts/llama-server.sh) on a GGUF export, its chat template read from the GGUF (--jinja);
    yields its address. Skips where it is not built."""
    import json
    import subprocess
    import sys
    import time
    import urllib.request

    binary = Path(sys.executable).parent / "llama-server"
    if not binary.is_file():
        pytest.skip("llama-server not built here (scripts/llama-server.sh needs cmake and a C++ compiler)")
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen([str(binary), "-m", str(model), "--mmproj", str(mmproj), "--jinja", "--host",
                                 "127.0.0.1", "--port", str(port), "-c", "2048", "-np", "2", "-t", "2", "--no-webui",
                                 *extra], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "LLAMA_ARG_NO_WEBUI": "1"})
        try:
            deadline = time.time() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        if json.loads(r.read()).get("status") == "ok":
                            break
                except OSError:
                    pass
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def post_json(url: str, body: dict) -> dict:
    """POST a JSON body to a test server, its JSON reply."""
    import json
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


CRASH_RESUME = {"train.epochs": 2, "train.max_steps": -1, "train.global_batch": 2, "train.per_device_batch": 2,
                "train.save_steps": 3, "train.logging_steps": 2, "train.lora_dropout": 0.1, "train.lr": 5e-3}


def crash_and_resume(tmp_path: Path, recipe, crash_at: int = 5):
    """Train `recipe(out)` whole into tmp_path/whole, and into tmp_path/cut with a crash at step `crash_at` (after
    the step-3 checkpoint), then resume it; assert the cut run left no finished marker before resuming. Returns
    both adapters (name -> tensor), for the caller to compare bit for bit."""
    from safetensors.torch import load_file

    from qilin_lite.train.stage import run_stage
    from qilin_lite.train.trainer import QilinTrainer

    class Crash(QilinTrainer):
        def training_step(self, *a, **k):
            if self.state.global_step == crash_at:
                raise KeyboardInterrupt("the machine went away")
            return super().training_step(*a, **k)

    run_stage(recipe(tmp_path / "whole"))
    with pytest.raises(KeyboardInterrupt):
        run_stage(recipe(tmp_path / "cut"), trainer_cls=Crash)
    assert (tmp_path / "cut" / "checkpoint-3").is_dir() and not (tmp_path / "cut" / "qilin.json").exists()
    run_stage(recipe(tmp_path / "cut"), resume=True)
    return tuple(load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("whole", "cut"))


def web_sends_chats_prompt(run: Path, uploads: list[list[Path]], question: str = "病灶位于哪里？"):
    """The web page's app (what its HTTP layer calls) on a run: each group of uploads reaches the model with the
    prompt ids chat sends for the same images and question. Returns each group's prompt ids and the generator."""
    import base64

    from qilin_lite.serve.chat_session import ChatSession
    from qilin_lite.serve.generate import load_generator
    from qilin_lite.serve.web_app import WebApp

    gen, info = load_generator(str(run), temperature=0, max_new_tokens=3, dtype="float32")
    web = WebApp(gen, info, "run")
    sent = []
    for shown in uploads:
        sid = web.new_session()
        web.set_image(sid, [{"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p in shown])
        events = list(web.ask(sid, question, {}))
        assert events[-1].get("done"), events[-3:]
        served = list(gen.last_prompt_ids)
        chat = ChatSession.load(str(run), temperature=0, max_new_tokens=3, dtype="float32")
        chat.load_image(shown)
        chat.ask(question)
        assert served == chat.generator.last_prompt_ids
        sent.append(served)
    return sent, gen


def served_prompt_is_chats(url: str, run: Path, cases) -> None:
    """Through a running llama-server: for each (messages as a client sends them, the same turns as training has
    them), its /apply-template (its own Jinja over the GGUF's template; its media marker where each image goes) is
    training's prompt text, and for a text-only case its /tokenize (special tokens parsed, as its completions do)
    is the ids chat sends."""
    import re

    from qilin_lite.serve.generate import load_generator

    gen, _ = load_generator(str(run), dtype="float32", attn="sdpa", temperature=0.0)
    t = gen.template
    for messages, trained in cases:
        got = post_json(f"{url}/apply-template", {"messages": messages})["prompt"]
        markers = set(re.findall(r"<__media_[A-Za-z0-9]{8,}__>", got))
        text = got.replace(next(iter(markers)), t.image_text) if markers else got
        want = t.render(t.place_images(trained), add_generation_prompt=True).text
        bos = gen.tokenizer.bos_token or ""
        assert text.removeprefix(bos) == want.removeprefix(bos), (got, want)
        if not markers:
            ids = post_json(f"{url}/tokenize", {"content": got, "add_special": True, "parse_special": True})
            assert ids["tokens"] == gen.prompt_ids(trained).tolist(), got


def smooth_image_run(root: Path, base: Path, texts: list[str], sizes, seed: int):
    """Two images of each size (smooth pictures, as scans are: two resamplers, PIL's and llama.cpp's, agree on them,
    not on noise), a one-turn record each, and `base` aligned then LoRA-tuned a few steps on them. Returns the tune
    run and the first image of each size; root/train.json and root/img are the records."""
    import json
    import random

    import numpy as np
    from PIL import Image

    from qilin_lite.train.stage import train_stage

    (root / "img").mkdir()
    rng, rows = random.Random(seed), []
    for i, size in enumerate(list(sizes) * 2):
        y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
        px = np.stack([np.sin(3 * x + i), np.cos(2 * y - i), np.sin(2 * (x + y) + 0.5 * i)], -1)
        Image.fromarray(((px + 1) * 127.5).astype(np.uint8)).save(root / "img" / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(texts)}, {"from": "gpt", "value": rng.choice(texts)}]})
    (root / "train.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    align, _ = train_stage(tiny_recipe("align", "align", root / "align", root / "train.json", root / "img",
                                       **{"model.base": str(base)}))
    tune, _ = train_stage(tiny_recipe("tune", "lora", root / "tune", root / "train.json", root / "img",
                                      **{"model.from_run": str(align)}))
    return tune, [root / "img" / f"{i}.png" for i in range(len(sizes))]


def served_answers_as_eval(url: str, served_model: str, run: Path, root: Path, out: Path) -> tuple[list, list]:
    """`eval --model RUN` and `eval --endpoint URL --images-as RUN` on root/train.json (greedy, 8 new tokens): each
    one's answers, in order."""
    import json

    from qilin_lite.eval.run import run_benchmark

    common = dict(image_folder=root / "img", max_new_tokens=8)
    run_benchmark(root / "train.json", "llava", out / "local", model=str(run), dtype="float32", **common)
    run_benchmark(root / "train.json", "llava", out / "served", endpoint=url, served_model=served_model,
                  images_as=str(run), concurrency=2, **common)

    def answers(d):
        return [json.loads(x)["prediction"] for x in (d / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]

    return answers(out / "local"), answers(out / "served")


def _train(recipe):
    """Train with the real code and keep the in-memory model, so tests can compare it with what was saved."""
    from qilin_lite.train.stage import train_stage

    out, model = train_stage(recipe)
    _MEMORY[str(out)] = model
    return out


@pytest.fixture(scope="session")
def in_memory():
    """output directory -> the model object as training left it."""
    return _MEMORY


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from qilin_lite.demo.data import DemoDataSpec, make_demo_data

    spec = DemoDataSpec(n_align=16, n_tune=16, n_heldout=8, image_size=32)
    return make_demo_data(tmp_path_factory.mktemp("data"), spec)


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
    """Hub-layout directories for a vision encoder and an LLM (what users name with hub ids)."""
    from qilin_lite.demo.base import TinySpec, build_tiny_base
    from qilin_lite.demo.data import CHOICES, QUESTIONS, DemoDataSpec, demo_texts

    spec = DemoDataSpec(image_size=32)
    questions = [(q, list(CHOICES[t])) for t in spec.tasks for q in QUESTIONS[t]]
    tiny = TinySpec(image_size=32, hidden=64, pretrain_steps=5)
    return build_tiny_base(tmp_path_factory.mktemp("parts"), demo_texts(spec), questions, tiny)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tiny_parts):
    from qilin_lite.model import assemble_base

    vision, llm = tiny_parts
    return assemble_base(str(vision), str(llm), tmp_path_factory.mktemp("base") / "base", dtype="float32")


@pytest.fixture(scope="session")
def tok_layout(tiny_base):
    """The tiny base's tokenizer (transformers' BPE, not SentencePiece) and its token layout at max_length 512."""
    from transformers import AutoConfig

    from qilin_lite.model import load_tokenizer_and_processor, token_layout

    tok, _ = load_tokenizer_and_processor(str(tiny_base))
    return tok, token_layout(AutoConfig.from_pretrained(tiny_base), max_length=512)


@pytest.fixture(scope="session")
def align_run(tmp_path_factory, tiny_base, tiny_data):
    out = tmp_path_factory.mktemp("runs") / "align"
    return _train(tiny_recipe("align", "align", out, tiny_data["align"], tiny_data["images"],
                                 **{"model.base": str(tiny_base)}))


def _tune_run(tmp_path_factory, mode: str, align_run, tiny_data):
    out = tmp_path_factory.mktemp("runs") / mode
    return _train(tiny_recipe("tune", mode, out, tiny_data["tune"], tiny_data["images"],
                              **{"model.from_run": str(align_run)}))


@pytest.fixture(scope="session")
def qlora_run(tmp_path_factory, align_run, tiny_data):
    return _tune_run(tmp_path_factory, "qlora", align_run, tiny_data)


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, align_run, tiny_data):
    return _tune_run(tmp_path_factory, "lora", align_run, tiny_data)


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, align_run, tiny_data):
    return _tune_run(tmp_path_factory, "full", align_run, tiny_data)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The bundled demo, run once: (its output directory, the lines it printed). The demo test checks what it
    learned; the GGUF test exports its tuned model."""
    from qilin_lite.demo.run import run_demo

    out = tmp_path_factory.mktemp("demo") / "demo"
    lines: list[str] = []
    run_demo(out, echo=lines.append)
    return out, lines
