"""Serving with the tools users already have: `transformers serve` (OpenAI-compatible) on a qilin-lite output
directory answers exactly as `qilin-lite chat` does: same prompt length, same greedy tokens."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import free_port

QUESTION = "病灶位于哪一侧？"
SEED = 1234


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_transformers_serve_answers_like_qilin_chat(full_run, tiny_data, tmp_path):
    image = sorted(Path(tiny_data["images"]).glob("*.png"))[0]  # square: no pad-vs-crop difference (README)
    serve_answers_like_chat(full_run, image, QUESTION, tmp_path)


def serve_answers_like_chat(model_dir, image: Path, question: str, tmp_path: Path) -> None:
    """`transformers serve MODEL_DIR` (its saved chat template, its processor) answers `question` about `image` with
    chat's prompt length, greedy answer and seeded sample. Shared with the Qwen2 family's test (test_qwen.py)."""
    from qilin_lite.serve.generate import load_generator

    gen, _ = load_generator(str(model_dir), dtype="float32", max_new_tokens=12, attn="sdpa", temperature=0.0)
    turn = [{"role": "user", "content": "<image>\n" + question}]  # as `qilin-lite chat` sends the first turn
    greedy = gen.generate([turn], [[image]])[0]
    prompt = torch.from_numpy(gen.prompt_ids(turn))[None]
    # a tiny model's greedy answer repeats one token; seeded sampling from its near-flat distribution only
    # matches if the logits match at every step, a much sharper check of prompt and image processing
    torch.manual_seed(SEED)
    sampled = gen.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), pixel_values=gen.images([image]),
                                 do_sample=True, temperature=1.0, top_k=50, top_p=1.0, max_new_tokens=12,
                                 eos_token_id=gen.stop_ids(), **dict(gen.template.generation))
    sampled = gen.tokenizer.decode(sampled[0, prompt.shape[1]:], skip_special_tokens=True).strip()

    port = free_port()
    cli = Path(sys.executable).parent / "transformers"
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([str(cli), "serve", str(model_dir), "--device", "cpu", "--host", "127.0.0.1",
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": question}]}]
        chat = f"http://127.0.0.1:{port}/v1/chat/completions"
        reply = _post(chat, {"model": str(model_dir), "max_tokens": 12, "temperature": 0, "messages": messages})
        sampling = json.dumps({"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 1.0})
        reply_sampled = _post(chat, {"model": str(model_dir), "max_tokens": 12, "seed": SEED,
                                     "generation_config": sampling, "messages": messages})
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert reply["usage"]["prompt_tokens"] == prompt.shape[1]  # the same prompt, image tokens included
    assert reply["choices"][0]["message"]["content"].strip() == greedy
    assert reply_sampled["choices"][0]["message"]["content"].strip() == sampled
