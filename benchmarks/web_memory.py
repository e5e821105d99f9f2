"""The web server's worst-case memory: a live `qilin-lite web`, the most expensive requests it accepts, its peak RSS.

    python benchmarks/web_memory.py               # the benchmarks' small Llava (harness/synth.py); ~3-5 min, 2 cores
    python benchmarks/web_memory.py --model RUN   # any directory `web` accepts

What is sent (to 127.0.0.1, as hostile clients would, with the server's own limits as the only defence):
1. four clients at once, each with the largest body an upload may have (64 MB of files as base64): undecodable
   bytes, so each costs the body, its parsed JSON and the decoded base64, and nothing after;
2. one tab after another uploading the largest image the server decodes (a 16-bit grey PNG whose header promises
   just under 128 MB decoded), more tabs than the 1 GiB of kept images holds, each then asking a question;
3. 64 questions of the largest size a question request may have (60 KB of text; refused past the context).

Printed: the server's RSS after loading (the model), its peak (VmHWM) and the peak minus the model, beside the
bound the README publishes. Nothing here is a pass/fail test; the limits themselves are tested in
tests/test_web_security.py.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 2**20


def rss(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of `pid` and its children (the server is one process: the CLI runs uvicorn in it)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def post(port: int, path: str, body: bytes, sid: str | None = None, timeout: float = 600) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json"}
    if sid:
        headers["X-Session"] = sid
    c.request("POST", path, body=body, headers=headers)
    r = c.getresponse()
    return r.status, r.read()


def largest_png() -> bytes:
    from PIL import Image

    from qilin_lite.serve.web_app import MAX_DECODED_BYTES

    side = int((MAX_DECODED_BYTES / 2) ** 0.5) - 8  # 16-bit grey, just under the decoded bound
    img = Image.linear_gradient("L").resize((side, side)).convert("I;16")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def start(model: str, log: Path) -> tuple[subprocess.Popen, int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = str(Path(sys.executable).with_name("qilin-lite"))
    p = subprocess.Popen([cli, "web", "--model", model, "--port", str(port), "--max-new-tokens", "8"],
                         stdout=open(log, "w"), stderr=subprocess.STDOUT,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    deadline = time.time() + 300
    while time.time() < deadline:
        if p.poll() is not None:
            raise SystemExit(log.read_text())
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return p, port
        time.sleep(0.5)
    raise SystemExit("the server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a directory `qilin-lite web` accepts (default: the benchmarks' small Llava)")
    ap.add_argument("--tabs", type=int, default=7, help="tabs uploading the largest image (the cap holds ~5)")
    args = ap.parse_args()
    from qilin_lite.serve.web_app import MAX_DECODED_BYTES, MAX_KEPT_BYTES, MAX_UPLOAD_BYTES

    work = Path(tempfile.mkdtemp(prefix="qilin-webmem-"))
    model = args.model
    if model is None:
        from benchmarks.harness.synth import ModelSize, build_base

        model = str(build_base(Path.home() / ".cache" / "qilin-lite" / "bench-base", ModelSize()))
    server, port = start(model, work / "server.log")
    try:
        session = lambda: json.loads(post(port, "/api/session", b"")[1])["session"]  # noqa: E731
        time.sleep(2)
        loaded = rss(server.pid)["VmRSS"]
        print(f"server after loading the model: {loaded / MB:.0f} MB RSS")
        phases = []

        # 1. four largest bodies at once
        junk = base64.b64encode(os.urandom(MAX_UPLOAD_BYTES - 4096)).decode()
        body = json.dumps({"files": [{"name": "x.png", "data": junk}]}).encode()
        sids = [session() for _ in range(4)]
        t0 = time.time()
        codes = []
        threads = [threading.Thread(target=lambda s=s: codes.append(post(port, "/api/image", body, s)[0]))
                   for s in sids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        phases.append(("4 clients x 64 MB bodies at once", codes, time.time() - t0, rss(server.pid)))

        # 2. the largest decodable image, more tabs than the cap keeps, each asking
        png = base64.b64encode(largest_png()).decode()
        body = json.dumps({"files": [{"name": "big.png", "data": png}]}).encode()
        codes = []
        t0 = time.time()
        for _ in range(args.tabs):
            sid = session()
            codes.append(post(port, "/api/image", body, sid)[0])
            codes.append(post(port, "/api/ask", json.dumps({"question": "病灶位于哪一侧？"}).encode(), sid)[0])
        phases.append((f"{args.tabs} tabs x largest image ({MAX_DECODED_BYTES // MB} MB decoded) + a question",
                       sorted(set(codes)), time.time() - t0, rss(server.pid)))

        # 3. largest questions, to the last tab (its image is kept)
        big = json.dumps({"question": "病灶位于哪一侧？" * (60 * 1024 // 24 - 4)}, ensure_ascii=False).encode()
        t0 = time.time()
        answers = [post(port, "/api/ask", big, sid) for _ in range(64)]
        codes = sorted({code for code, _ in answers})
        phases.append(("64 questions of 60 KB", codes, time.time() - t0, rss(server.pid)))
        print("a 60 KB question:", answers[0][0], answers[0][1][:200].decode(errors="replace"))

        for name, got, seconds, mem in phases:
            print(f"{name:58s} HTTP {got}  {seconds:6.1f} s  RSS {mem['VmRSS'] / MB:6.0f} MB  "
                  f"peak so far {mem['VmHWM'] / MB:6.0f} MB")
        peak = phases[-1][3]["VmHWM"]
        print(f"\npeak RSS {peak / MB:.0f} MB = model {loaded / MB:.0f} MB + {(peak - loaded) / MB:.0f} MB "
              f"(kept-images cap {MAX_KEPT_BYTES // MB} MB, one decode <= {MAX_DECODED_BYTES // MB} MB decoded)")
    finally:
        server.terminate()
        server.wait(timeout=30)
        log = (work / "server.log").read_text(errors="replace")
        if "Traceback" in log:
            print("server log has a traceback:\n" + log[-3000:])


if __name__ == "__main__":
    main()
