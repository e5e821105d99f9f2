"""`eval --endpoint URL --served-model NAME`: a benchmark answered by an OpenAI-compatible server.

A stand-in server (http.server, here) shows what is sent (each question's images as PNG data URLs of the pixels
qilin-lite decodes, then its text; N requests in flight; no DICOM header) and that a server that is down, slow, fails
mid-run or answers nonsense is one line with what was answered kept; `transformers serve` on a trained output
directory scores the benchmark with the in-process `eval`'s numbers."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, reply_chat_completion, reply_json
from PIL import Image

from qilin_lite.errors import UserError
from qilin_lite.eval import format_prompt, load_eval_items, run_eval
from qilin_lite.eval.endpoint import endpoint_generate
from qilin_lite.eval.run import run_benchmark
from qilin_lite.images.decode import load_image


class FakeServer:
    """A chat-completions server whose answers and failures the test sets; it records every request body."""

    def __init__(self, answer=lambda body: "A", delay: float = 0.0):
        self.answer, self.delay, self.bodies = answer, delay, []
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/v1/models":
                    return reply_json(self, {"object": "list", "data": [{"id": "fake-model"}]})
                if self.path == "/version":
                    return reply_json(self, {"version": "9.9-fake"})
                self.send_error(404)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.bodies.append(body)
                    fake.in_flight += 1
                    fake.most_in_flight = max(fake.most_in_flight, fake.in_flight)
                try:  # a client that gave up (the slow case) leaves a broken pipe: not the test's concern
                    time.sleep(fake.delay)
                    reply = fake.answer(body)
                    if isinstance(reply, int):
                        self.send_error(reply, "model 'nope' not found")
                    elif isinstance(reply, bytes):
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(reply)))
                        self.end_headers()
                        self.wfile.write(reply)
                    else:
                        reply_chat_completion(self, reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    made = []

    def make(**kw):
        made.append(FakeServer(**kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def question_of(body) -> str:
    content = body["messages"][0]["content"]
    return content if isinstance(content, str) else content[-1]["text"]


def sent_image(part) -> np.ndarray:
    assert part["type"] == "image_url"
    url = part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def test_each_question_goes_as_images_then_text_with_n_in_flight(server, tiny_data, tmp_path):
    items = load_eval_items(tiny_data["heldout"], "llava", tiny_data["images"])
    # the server knows each question by the exact pixels qilin-lite decodes from its image (a lookup that fails on
    # any other pixels); right on every other question, so the metrics have something to agree on
    by_pixels = {np.asarray(load_image(it.image)).tobytes(): it for it in items}
    answer_of = {it.id: (it.reference if i % 2 == 0 else "Z") for i, it in enumerate(items)}

    def answer(body):
        *images, text = body["messages"][0]["content"]
        assert len(images) == 1 and text["type"] == "text"
        item = by_pixels[sent_image(images[0]).tobytes()]
        assert text["text"] == format_prompt(item)
        return answer_of[item.id]

    fake = server(answer=answer, delay=0.2)
    generate, described = endpoint_generate(fake.url, "fake-model", max_new_tokens=7, concurrency=3)
    served = run_eval(items, generate, tmp_path / "served", batch_size=12)
    local = run_eval(items, lambda batch: [answer_of[it.id] for it in batch], tmp_path / "local")
    assert served == local and 0 < served["groups"]["all"]["accuracy"] < 1
    assert len(fake.bodies) == len(items) and fake.most_in_flight == 3
    assert described["server"] == {"version": "9.9-fake", "build_info": None, "listed_models": ["fake-model"]}
    assert described["name"] == "fake-model" and described["endpoint"] == fake.url
    for body in fake.bodies:
        assert (body["model"], body["temperature"], body["max_tokens"], body["stream"]) == ("fake-model", 0, 7, False)


def test_a_dicom_goes_as_its_rendered_pixels_without_its_header(server, tmp_path):
    from qilin_lite.eval import EvalItem
    from test_images import write_dicom

    dcm = tmp_path / "ct.dcm"
    write_dicom(dcm, (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 7), slope=1.0, intercept=-1024.0,
                window=(40.0, 400.0))
    item = EvalItem(id="q1", image=str(dcm), question="有无病灶？", reference="yes", task="vqa-rad", kind="closed")
    fake = server(answer=lambda body: "yes")
    generate, _ = endpoint_generate(fake.url, "fake-model")
    assert generate([item]) == ["yes"]
    raw = json.dumps(fake.bodies[0])
    for identifier in ("DOE", "PID12345", "19700101", "General Hospital"):
        assert identifier not in raw
    sent = sent_image(fake.bodies[0]["messages"][0]["content"][0])
    assert sent.shape == (48, 64, 3) and np.array_equal(sent, np.asarray(load_image(dcm)))


def test_images_as_a_pad_run_saw_them_in_training(server, tiny_base, tmp_path):
    """A server's processor only resizes: for a run trained with `pad`, a non-square image goes padded to a square
    in the run's fill colour, as `qilin-lite image --model RUN` writes it; without --images-as, as decoded."""
    from qilin_lite.eval import EvalItem
    from qilin_lite.serve.image_file import prepare_image

    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 50, 3), dtype=np.uint8)).save(wide)
    item = EvalItem(id="q1", image=str(wide), question="有无病灶？", reference="yes", task="vqa-rad", kind="closed")
    fake = server(answer=lambda body: "yes")
    generate, described = endpoint_generate(fake.url, "fake-model", images_as=str(tiny_base))
    generate([item])
    expected = np.asarray(Image.open(prepare_image(wide, tmp_path / "as-trained.png", model=str(tiny_base))))
    assert sent_image(fake.bodies[0]["messages"][0]["content"][0]).tolist() == expected.tolist()
    assert expected.shape == (50, 50, 3) and described["images"]["image_mode"] == "pad"
    generate, described = endpoint_generate(fake.url, "fake-model")
    generate([item])
    assert sent_image(fake.bodies[1]["messages"][0]["content"][0]).shape == (20, 50, 3)
    assert described["images"] == "decoded, each on its own"


def test_a_failing_server_keeps_what_it_answered_and_the_rerun_asks_the_rest(server, tiny_data, tmp_path):
    out = tmp_path / "out"
    calls = []

    def flaky(body):
        calls.append(question_of(body))
        return 400 if len(calls) == 6 else "A"

    fake = server(answer=flaky)
    args = dict(model=None, image_folder=tiny_data["images"], endpoint=fake.url, served_model="fake-model",
                concurrency=1)
    with pytest.raises(UserError, match=r"HTTP 400 .*check --served-model.*\(5 of 8 answers are kept in .*predictions.jsonl; rerun into the same --out"):
        run_benchmark(tiny_data["heldout"], "llava", out, **args)
    kept = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(kept) == 5
    calls.clear()
    fake.answer = lambda body: (calls.append(question_of(body)), "A")[1]
    metrics = run_benchmark(tiny_data["heldout"], "llava", out, **args)
    assert len(calls) == 3 and metrics["n"] == 8  # only the three not yet answered
    assert metrics["protocol"]["model"]["kind"] == "endpoint"
    assert metrics["protocol"]["decoding"] == {"greedy": True, "max_new_tokens": 64, "temperature": 0, "top_p": 1,
                                               "served": True}


@pytest.mark.parametrize("case, needle", [
    ("down", "cannot reach the server"),
    ("slow", "no answer within --timeout 0.5 s"),
    ("garbage", "the reply is not an OpenAI-style chat completion"),
    ("5xx", "HTTP 503"),
])
def test_server_problems_are_one_line(server, tiny_data, tmp_path, case, needle):
    if case == "down":
        url = f"http://127.0.0.1:{free_port()}"
    else:
        reply = {"slow": "A", "garbage": b"<html>hello</html>", "5xx": 503}[case]
        fake = server(answer=lambda body: reply, delay=2.0 if case == "slow" else 0.0)
        url = fake.url
    items = load_eval_items(tiny_data["heldout"], "llava", tiny_data["images"])
    with pytest.raises(UserError, match=needle) as e:
        generate, _ = endpoint_generate(url, "fake-model", timeout=0.5, concurrency=1)
        run_eval(items, generate, tmp_path / "out")
    assert "\n" not in str(e.value)
    if case == "5xx":
        assert len(fake.bodies) == 3  # asked again twice before giving up


def test_ctrl_c_sends_no_queued_question(server, tiny_data):
    """Ctrl-C while a batch is answered: the questions still queued are not sent (the pool would otherwise send
    them all before letting go), and the interrupt reaches the caller at once."""
    import signal

    items = load_eval_items(tiny_data["heldout"], "llava", tiny_data["images"]) * 3  # 24 questions
    fake = server(answer=lambda body: "A", delay=0.3)
    generate, _ = endpoint_generate(fake.url, "fake-model", timeout=5, concurrency=1)

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.8)
        t0 = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            generate(items)
        waited = time.perf_counter() - t0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    time.sleep(0.5)  # the one request in flight may still land
    assert waited < 0.8 + 0.3 * 2 and len(fake.bodies) <= 5, (waited, len(fake.bodies))


@pytest.mark.parametrize("url", ["http://user:s3cret@127.0.0.1:8000", "http://127.0.0.1:8000/v1?api_key=s3cret",
                                 "https://:s3cret@example.org/v1"])
def test_a_secret_in_the_address_is_refused_and_never_echoed(url):
    """The address goes into protocol.json and the logs; a password or key in it would be kept there."""
    from qilin_lite.eval.endpoint import check_flags

    with pytest.raises(UserError, match="QILIN_ENDPOINT_API_KEY") as e:
        check_flags(url, "m", 1, 5.0)
    assert "s3cret" not in str(e.value) and "\n" not in str(e.value)


def test_cli_flags(tiny_data, tmp_path):
    cli = Path(sys.executable).parent / "qilin-lite"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QILIN_LOG": "WARNING"}
    base = [str(cli), "eval", "--data", str(tiny_data["heldout"]), "--task", "llava", "--out", str(tmp_path / "o"),
            "--image-folder", str(tiny_data["images"])]
    for extra, says in (
        (["--endpoint", "http://127.0.0.1:9"], "error: --endpoint URL and --served-model NAME go together"),
        (["--endpoint", "http://127.0.0.1:9", "--served-model", "m", "--model", "x"], "error: give one source"),
        (["--endpoint", "127.0.0.1:8000", "--served-model", "m"], "error: --endpoint 127.0.0.1:8000: give the server's"),
        (["--endpoint", f"http://127.0.0.1:{free_port()}", "--served-model", "m"], "cannot reach the server"),
        (["--endpoint", "http://127.0.0.1:9", "--served-model", "m", "--concurrency", "0"], "--concurrency must be"),
    ):
        r = subprocess.run(base + extra, capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and says in r.stderr, (extra, r.stderr)


@pytest.mark.slow
def test_transformers_serve_scores_as_in_process_eval(full_run, tiny_data, tmp_path):
    """The same benchmark through `transformers serve MODEL_DIR` (its saved chat template and processor) and through
    the in-process eval: the same answers, the same numbers."""
    import urllib.request

    local = run_benchmark(tiny_data["heldout"], "llava", tmp_path / "local", model=str(full_run),
                          image_folder=tiny_data["images"], max_new_tokens=8, dtype="float32", attn="sdpa")
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "transformers"), "serve", str(full_run), "--device",
                               "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        served = run_benchmark(tiny_data["heldout"], "llava", tmp_path / "served", endpoint=f"http://127.0.0.1:{port}",
                               served_model=str(full_run), image_folder=tiny_data["images"], max_new_tokens=8,
                               concurrency=2)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

    def answers(d):
        return [json.loads(x)["prediction"] for x in (d / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]

    assert answers(tmp_path / "served") == answers(tmp_path / "local")
    assert served["groups"] == local["groups"]


def test_image_blind_through_an_endpoint_sends_the_runs_mean_colour(server, tiny_data, qlora_run, tmp_path):
    """--image-blind --images-as RUN: the blank images sent are in that run's processor mean colour, as in-process
    eval makes them (before: a fixed grey)."""
    from qilin_lite.eval.run import run_benchmark
    from qilin_lite.images.pixel_values import pad_fill
    from qilin_lite.model import load_tokenizer_and_processor

    fake = server(answer=lambda body: "A")
    run_benchmark(tiny_data["heldout"], "llava", tmp_path / "out", endpoint=fake.url, served_model="m",
                  images_as=str(qlora_run), image_folder=tiny_data["images"], image_blind=True, concurrency=1,
                  max_new_tokens=4)
    want = pad_fill(load_tokenizer_and_processor(str(qlora_run))[1].image_mean)
    assert want != (127, 127, 127)
    plain = [sent_image(b["messages"][0]["content"][0]) for b in fake.bodies]
    blanks = [px for px in plain if (px == px.reshape(-1, 3)[0]).all()]
    assert blanks and all(tuple(int(c) for c in px.reshape(-1, 3)[0]) == want for px in blanks)
