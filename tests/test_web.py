"""`qilin-lite web` driven in a real headless browser (Debian's chromium through Playwright): a DICOM with a window
preset and a Chinese question gets `chat --temperature 0`'s answer; two tabs keep their own images and answers; a
corrupt upload is a message and the next question works; no request leaves 127.0.0.1; no planted DICOM identifier
reaches the page or the server log."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import web_server

CLI = str(Path(sys.executable).with_name("qilin-lite"))
Q = "病灶位于哪一侧？"
PATIENT = ("DOE^JANE", "PID12345", "19700101", "General Hospital")
MAX_NEW = "8"


def _browser_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def server(lora_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("web") / "server.log"
    with web_server(["--model", lora_run, "--temperature", "0", "--max-new-tokens", MAX_NEW], log) as port:
        yield f"http://127.0.0.1:{port}", log


@pytest.fixture(scope="module")
def browser():
    path = _browser_path()
    if path is None:
        pytest.skip("no chromium here (scripts/test.sh installs Debian's chromium where apt-get can)")
    pw = pytest.importorskip("playwright.sync_api")
    with pw.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


def dicom(tmp_path: Path, name: str, left: bool) -> Path:
    from test_images import write_dicom

    hu = np.full((48, 40), -900, dtype=np.int64)  # air
    cols = slice(2, 14) if left else slice(26, 38)
    hu[16:32, cols] = 60  # a soft-tissue lesion, visible in the mediastinal window
    return write_dicom(tmp_path / name, ((hu + 1024) // 2).astype(np.uint16), slope=2, intercept=-1024)


def chat_answer(run, image: Path, window: str | None = None) -> str:
    args = [CLI, "chat", str(image), "--model", str(run), "--prompt", Q, "--temperature", "0", "--max-new-tokens",
            MAX_NEW]
    if window:
        args += ["--window", window]
    r = subprocess.run(args, capture_output=True, text=True, encoding="utf-8", env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def open_page(browser, base: str, requests: list):
    # a context is a separate browser profile (its own tab session); bypass_csp only lets the test evaluate its
    # wait conditions, the page itself runs under its Content-Security-Policy
    ctx = browser.new_context(bypass_csp=True)
    page = ctx.new_page()
    page.on("request", lambda r: requests.append(r.url))
    page.goto(base)
    page.wait_for_function("document.getElementById('notice').textContent.length > 0")
    return ctx, page


def upload_and_ask(page, files, window: str = "auto", question: str = Q) -> None:
    page.select_option("#window-preset", window)
    page.set_input_files("#image-upload", [str(f) for f in files])
    page.wait_for_function("document.getElementById('preview').style.display === 'block' || "
                           "document.getElementById('error').textContent.length > 0")
    assert page.inner_text("#error") == "", page.inner_text("#error")
    page.fill("#question", question)
    page.press("#question", "Enter")


def wait_answer(page) -> str:
    page.wait_for_function("!document.getElementById('send').disabled && document.getElementById('answer')")
    return page.inner_text("#answer").strip()


@pytest.mark.slow
def test_dicom_window_chinese_question_equals_chat(browser, server, lora_run, tmp_path):
    base, log = server
    dcm = dicom(tmp_path, "ct.dcm", left=True)
    requests: list[str] = []
    ctx, page = open_page(browser, base, requests)
    assert "不构成医疗诊断" in page.inner_text("#notice") and page.is_visible("#notice")
    upload_and_ask(page, [dcm], window="mediastinum")
    got = wait_answer(page)
    assert got and got == chat_answer(lora_run, dcm, "40,400")
    assert not page.is_visible("#add")  # this template joins images into one: nothing to add to a question
    # the page is Chinese first and switches to English; the notice stays
    assert page.inner_text("#send") == "发送"
    page.click("#lang")
    assert page.inner_text("#send") == "Send" and "not a diagnosis" in page.inner_text("#notice")
    artifacts = Path(os.environ.get("QILIN_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(artifacts / "web.png"), full_page=True)
    html = page.content()
    ctx.close()
    assert requests and all(u.startswith(base + "/") for u in requests), requests  # nothing leaves 127.0.0.1
    served = log.read_text()
    for v in PATIENT:
        assert v not in html and v not in served


@pytest.mark.slow
def test_two_sessions_keep_their_own_image_and_answer(browser, server, lora_run, tmp_path):
    base, _ = server
    left, right = dicom(tmp_path, "l.dcm", left=True), dicom(tmp_path, "r.dcm", left=False)
    want = {left: chat_answer(lora_run, left, "40,400"), right: chat_answer(lora_run, right, "40,400")}
    requests: list[str] = []
    pages = [open_page(browser, base, requests) for _ in range(2)]
    for (_, page), f in zip(pages, (left, right)):
        upload_and_ask(page, [f], window="mediastinum")  # both asked before either answer is read: they queue
    got = {f: wait_answer(page) for (_, page), f in zip(pages, (left, right))}
    assert got == want
    # each tab still holds its own image: a follow-up in tab 2 is about tab 2's image
    p2 = pages[1][1]
    p2.click("#clear")
    p2.fill("#question", Q)
    p2.press("#question", "Enter")
    assert wait_answer(p2) == want[right]
    for ctx, _ in pages:
        ctx.close()


@pytest.mark.slow
def test_a_corrupt_upload_is_a_message_and_the_next_question_works(browser, server, lora_run, tmp_path):
    base, log = server
    bad = tmp_path / "broken.dcm"
    good = dicom(tmp_path, "good.dcm", left=True)
    bad.write_bytes(good.read_bytes()[:300])  # a truncated DICOM: its header (with patient data) but no pixels
    requests: list[str] = []
    ctx, page = open_page(browser, base, requests)
    page.select_option("#window-preset", "mediastinum")
    page.set_input_files("#image-upload", [str(bad)])
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    err = page.inner_text("#error")
    assert "broken.dcm" in err and "DICOM" in err
    for v in PATIENT:
        assert v not in err and v not in page.content()
    page.fill("#question", "")
    page.press("#question", "Enter")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    upload_and_ask(page, [good], window="mediastinum")
    assert wait_answer(page) == chat_answer(lora_run, good, "40,400")
    assert page.inner_text("#error") == ""
    ctx.close()
    for v in PATIENT:
        assert v not in log.read_text()


def test_bad_requests_are_one_message_each(lora_run):
    """The HTTP layer without a browser: too many images, an empty question, no image yet, a bad window, images
    added to a composite template's conversation."""
    from qilin_lite.errors import UserError
    from qilin_lite.serve.generate import load_generator
    from qilin_lite.serve.web_app import WebApp
    from qilin_lite.serve.web_input import window_setting

    gen, info = load_generator(str(lora_run), temperature=0, max_new_tokens=4)
    web = WebApp(gen, info, "run")
    sid = web.new_session()
    with pytest.raises(UserError, match="at most 4 images"):
        web.set_image(sid, [{"name": f"{i}.png", "data": "AA=="} for i in range(5)])
    with pytest.raises(UserError, match="upload an image first"):
        next(web.ask(sid, Q, {}))
    with pytest.raises(UserError, match="not-base64.png: the upload arrived damaged"):
        web.set_image(sid, [{"name": "not-base64.png", "data": "%%%"}])
    with pytest.raises(UserError, match="joins images into one; load new images"):  # /add: separate templates only
        web.set_image(sid, [{"name": "1.png", "data": "AA=="}], add=True)
    with pytest.raises(UserError, match="a width >= 1, got 40,0"):
        window_setting("40,0")
    with pytest.raises(UserError, match="session id"):
        web.session("../x")


def test_requests_queue_behind_the_one_model_and_say_so(lora_run, tiny_data):
    import base64

    from qilin_lite.serve.generate import load_generator
    from qilin_lite.serve.web_app import WebApp

    gen, info = load_generator(str(lora_run), temperature=0, max_new_tokens=4)
    web = WebApp(gen, info, "run")
    sid = web.new_session()
    first = sorted(Path(tiny_data["images"]).iterdir())[0]
    web.set_image(sid, [{"name": first.name, "data": base64.b64encode(first.read_bytes()).decode()}])
    web.lock.acquire()  # another tab is generating
    events: list = []
    t = threading.Thread(target=lambda: events.extend(web.ask(sid, Q, {})))
    t.start()
    time.sleep(0.5)
    assert t.is_alive()  # waiting for the lock
    web.lock.release()
    t.join(timeout=120)
    assert events[0] == {"queued": 1} and events[1] == {"started": True} and events[-1]["done"]
    assert not web.lock.locked()


def test_nothing_is_stored_unless_log_dir_and_then_only_the_models_view(lora_run, tmp_path, monkeypatch):
    import base64

    from qilin_lite.serve.generate import load_generator
    from qilin_lite.serve.web_app import WebApp

    gen, info = load_generator(str(lora_run), temperature=0, max_new_tokens=4)
    dcm = dicom(tmp_path, "ct.dcm", left=True)
    upload = [{"name": "张三_CT.dcm", "data": base64.b64encode(dcm.read_bytes()).decode()}]
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.rglob("*"))
    plain = WebApp(gen, info, "run")
    sid = plain.new_session()
    plain.set_image(sid, upload, window=(40, 400))
    list(plain.ask(sid, Q, {}))
    assert set(tmp_path.rglob("*")) == before  # nothing written

    logged = WebApp(gen, info, "run", log_dir=tmp_path / "logs")
    sid = logged.new_session()
    logged.set_image(sid, upload, window=(40, 400))
    events = list(logged.ask(sid, Q, {}))
    [conv] = list((tmp_path / "logs").iterdir())
    assert sorted(p.name for p in conv.iterdir()) == ["image.png", "transcript.json"]
    transcript = json.loads((conv / "transcript.json").read_text(encoding="utf-8"))
    assert transcript["messages"][-1]["content"] == events[-1]["answer"]
    for f in conv.iterdir():
        data = f.read_bytes()
        assert not data.startswith(b"DICM") and b"DICM" not in data[:200]
        for v in PATIENT + ("张三",):
            assert v.encode() not in data


def test_stop_regenerate_and_clear(lora_run, tiny_data):
    import base64

    from qilin_lite.serve.generate import load_generator
    from qilin_lite.serve.web_app import WebApp

    gen, info = load_generator(str(lora_run), temperature=0, max_new_tokens=6)
    web = WebApp(gen, info, "run")
    sid = web.new_session()
    img = sorted(Path(tiny_data["images"]).iterdir())[0]
    web.set_image(sid, [{"name": img.name, "data": base64.b64encode(img.read_bytes()).decode()}])
    first = list(web.ask(sid, Q, {}))[-1]["answer"]
    again = list(web.ask(sid, None, {}, regenerate=True))[-1]
    assert again["answer"] == first and len(web.session(sid).chat.history) == 2  # greedy: the same answer, replaced
    # Stop while waiting in the queue: the answer ends before it starts and is not kept
    web.lock.acquire()
    events: list = []
    t = threading.Thread(target=lambda: events.extend(web.ask(sid, "第二个问题", {})))
    t.start()
    time.sleep(0.3)
    web.stop(sid)
    web.lock.release()
    t.join(timeout=60)
    assert events[-1] == {"done": True, "stopped": True, "answer": ""}
    assert len(web.session(sid).chat.history) == 2
    web.clear(sid)
    assert web.session(sid).chat.history == [] and web.session(sid).chat.image is not None


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path):
    from qilin_lite.errors import UserError
    from qilin_lite.serve.web import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UserError, match=rf"127\.0\.0\.1:{port}: cannot listen there .*pick another --port"):
            serve(str(tmp_path / "no-model-needed"), port=port)


@pytest.mark.slow
def test_a_refused_request_says_why_in_the_status_line(browser, server, tmp_path):
    """Issue 34.3: when the server refused the tab's session (429) the upload silently did nothing and the status
    still said 就绪. Now a refusal's reason shows in the status line, in Chinese first as the page is (English after
    the switch), the detail below it: an upload over the server's budget (real), and a refused session (the
    server's 429 answer, as web_sessions.py words it, fulfilled by the browser)."""
    from PIL import Image

    from qilin_lite.serve.web_sessions import Sessions

    base, _ = server
    files = []
    for i in range(4):  # each within the per-image bound; joined, far over the request's
        files.append(tmp_path / f"big{i}.png")
        Image.new("L", (4000, 4000), 90).save(files[-1])
    requests: list[str] = []
    ctx, page = open_page(browser, base, requests)
    page.set_input_files("#image-upload", [str(f) for f in files])
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "图像过大" in page.inner_text("#status") and "就绪" not in page.inner_text("#status")
    assert "per upload" in page.inner_text("#error") and "big0.png" in page.inner_text("#error")
    page.click("#lang")
    assert "per upload" in page.inner_text("#status")
    ctx.close()

    refusal = Sessions.refusal(True)
    ctx, page = open_page(browser, base, requests)
    page.route("**/api/session", lambda route: route.fulfill(
        status=429, content_type="application/json",
        body=json.dumps({"error": str(refusal), "zh": refusal.zh}, ensure_ascii=False)))
    page.set_input_files("#image-upload", [str(dicom(tmp_path, "ct.dcm", left=True))])
    page.wait_for_function("document.getElementById('status').textContent.includes('标签页')")
    assert page.inner_text("#status") == refusal.zh and "close one" in page.inner_text("#error")
    ctx.close()
