"""`qilin-lite web` refuses what is not its own user: other hosts (DNS rebinding), other sites' pages, requests
without the token, clients that would evict another tab, and malformed bodies (a 4xx with a message, never a 500)."""

from __future__ import annotations

import http.client
import json
import sys
from pathlib import Path

import pytest
from conftest import web_server

CLI = str(Path(sys.executable).with_name("qilin-lite"))
pytest.importorskip("fastapi")


def request(port: int, method: str, path: str, body=None, **headers) -> tuple[int, dict, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Host": f"127.0.0.1:{port}", **{k.replace("_", "-"): v for k, v in headers.items()}}
    data = None if body is None else (body if isinstance(body, (bytes, str)) else json.dumps(body))
    if data is not None:
        headers["Content-Type"] = "application/json"
    c.request(method, path, body=data, headers=headers)
    r = c.getresponse()
    raw = r.read()
    try:
        payload = json.loads(raw.decode().splitlines()[0]) if raw.strip() else {}
    except (ValueError, IndexError):
        payload = {"raw": raw[:200]}
    return r.status, {k.lower(): v for k, v in r.getheaders()}, payload


@pytest.fixture(scope="module")
def web(lora_run, tmp_path_factory):
    args = ["--model", lora_run, "--max-new-tokens", "4", "--temperature", "0"]
    with web_server(args, tmp_path_factory.mktemp("websec") / "server.log") as port:
        yield port


def test_only_its_own_host_and_origin_get_an_answer(web, lora_run):
    for path, method in (("/", "GET"), ("/api/info", "GET"), ("/api/session", "POST")):
        status, _, body = request(web, method, path, Host="evil.example")  # a DNS-rebinding page's request
        assert status == 403 and "answers only to" in body["error"], path
        status, _, body = request(web, method, path, Origin="http://evil.example")  # another site's page
        assert status == 403 and "other sites" in body["error"], path
    status, headers, info = request(web, "GET", "/api/info", Origin=f"http://localhost:{web}", Host=f"localhost:{web}")
    assert status == 200 and headers["x-frame-options"] == "DENY"
    assert str(lora_run) not in json.dumps(info) and info["model"] == Path(lora_run).name  # no absolute paths
    status, headers, _ = request(web, "GET", "/")
    assert "frame-ancestors 'none'" in headers["content-security-policy"]


def test_sessions_are_issued_by_the_server(web):
    status, _, body = request(web, "POST", "/api/clear", **{"X-Session": "my-own-chosen-id-123"})
    assert status == 410 and "reload the page" in body["error"]  # a client cannot make up (or guess) a session
    a, b = (request(web, "POST", "/api/session")[2]["session"] for _ in range(2))
    assert a != b and len(a) >= 24
    assert request(web, "POST", "/api/clear", **{"X-Session": a})[0] == 200


def test_a_full_server_evicts_only_idle_tabs(lora_run):
    from qilin_lite.generate import load_generator
    from qilin_lite.web import IDLE_EVICT_S, MAX_SESSIONS, TooManyTabs, WebApp

    gen, info = load_generator(str(lora_run), temperature=0, max_new_tokens=4)
    app = WebApp(gen, info, "run")
    ids = [app.new_session() for _ in range(MAX_SESSIONS)]
    with pytest.raises(TooManyTabs):
        app.new_session()  # 70 new sessions cannot push out a tab in use
    assert set(ids) == set(app.sessions)
    app.sessions[ids[5]].used -= IDLE_EVICT_S + 1
    app.new_session()
    assert ids[5] not in app.sessions and len(app.sessions) == MAX_SESSIONS


def test_a_token_guards_the_api(lora_run, tmp_path):
    with web_server(["--model", lora_run, "--token", "s3cret-token"], tmp_path / "server.log") as port:
        assert request(port, "POST", "/api/session")[0] == 401
        assert request(port, "GET", "/api/info", X_Token="wrong")[0] == 401
        assert request(port, "GET", "/api/info", X_Token="s3cret-token")[0] == 200
        assert request(port, "GET", "/api/info", Cookie="qilin_token=s3cret-token")[0] == 200
        assert request(port, "GET", "/")[0] == 200  # the page itself holds nothing; it reads the token from #token=


def test_listening_beyond_loopback_warns_and_makes_a_token(lora_run, monkeypatch, capsys):
    import uvicorn
    from conftest import free_port as port

    from qilin_lite.web import serve

    ran = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.append(kw))
    serve(str(lora_run), host="0.0.0.0", port=port())
    out = capsys.readouterr().out
    assert out.startswith("warning: listening on 0.0.0.0") and "#token=" in out and ran[0]["host"] == "0.0.0.0"
    serve(str(lora_run), host="0.0.0.0", port=port(), no_auth=True)
    out = capsys.readouterr().out
    assert "--no-auth" in out and "#token=" not in out


def test_malformed_bodies_are_4xx_with_a_message(web):
    """Random JSON bodies (hypothesis) to every endpoint: a message and a 4xx each, and the server keeps answering."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    sid = request(web, "POST", "/api/session")[2]["session"]
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=8), inner, max_size=4), max_leaves=10)
    keys = st.sampled_from(["files", "frame", "window", "question", "settings", "regenerate", "name", "data"])
    bodies = st.dictionaries(keys, values, max_size=5) | values

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(["/api/image", "/api/ask", "/api/stop", "/api/clear"]), body=bodies)
    def post(path, body):
        raw = json.dumps(body, allow_nan=True)  # NaN / Infinity as a browser's JSON.stringify never would
        status, _, payload = request(web, "POST", path, raw, **{"X-Session": sid})
        assert status < 500, (path, raw, payload)
        if status >= 400 and status != 422:  # 422: FastAPI's own refusal of a body that is not JSON at all
            assert isinstance(payload.get("error"), str) and payload["error"], (path, raw, payload)

    post()
    assert request(web, "GET", "/api/info")[0] == 200
