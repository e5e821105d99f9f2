"""The web server's worst-case memory: a live `qilin-lite web`, the most expensive requests it accepts, its peak RSS.

    python benchmarks/web_memory.py               # the benchmarks' small Llava (harness/synth.py); ~7 min, 2 cores
    python benchmarks/web_memory.py --model RUN   # any directory `web` accepts

What is sent (to 127.0.0.1, as hostile clients would, with the server's own limits as the only defence):
1. four clients (four loopback addresses) at once, each with the largest body an upload may have (64 MB of files as
   base64): undecodable bytes, so each costs the body, its parsed JSON and the decoded base64, and nothing after;
2. composites: four 8-bit 9400x9400 PNGs (86 KB each, each within the per-image bound; the old server joined them
   into a 37600x37600 view and went past 11 GB), then the largest four-image composite the request budget admits,
   asked about;
3. deflate bombs: DICOMs declaring 8x8 pixels with 512 MB and 2 GB of pixel data (0.5 MB and 2 MB files);
4. one tab after another uploading the largest image the server decodes (a 16-bit grey PNG whose header promises
   just under 128 MB decoded), more tabs than the 1 GiB of kept images holds, each then asking a question;
5. floods: 1,000 sessions at once, 3,000 connections with half-sent headers (then a normal request, timed), and
   four uploads trickled at 70 KB/s (just above the rate floor) until the deadline refuses them;
6. 64 questions of the largest size a question request may have (60 KB of text; refused past the context).

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
import socket
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


def post(port: int, path: str, body: bytes, sid: str | None = None, timeout: float = 600,
         source: str | None = None) -> tuple[int, bytes]:
    """`source`: another loopback address to send from (127.0.0.2, ...): another client to the server."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0) if source else None)
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


def grey_png(side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (side, side), 90).save(buf, format="PNG")
    return buf.getvalue()


def largest_composite_side() -> int:
    """The largest side of four square 8-bit grey PNGs the request budget admits, by the server's own estimate."""
    from qilin_lite.images.limits import Header, pipeline_bytes
    from qilin_lite.serve.web_app import MAX_REQUEST_BYTES

    side = 64
    while pipeline_bytes([Header(side + 64, side + 64, (side + 64) ** 2)] * 4, joined=True, pad=True) \
            <= MAX_REQUEST_BYTES:
        side += 64
    return side


def deflate_bomb(path: Path, pixel_bytes: int) -> bytes:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_web_security import deflated_dicom_carrying

    return deflated_dicom_carrying(path, pixel_bytes).read_bytes()


def get(port: int, path: str) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", path, headers={"Host": f"127.0.0.1:{port}"})
    return c.getresponse().status


def trickle(port: int, sid: str, rate: int, seconds: float, source: str = "127.0.0.2") -> int:
    """An upload from `source` (another loopback address: another client) whose body comes at `rate` bytes/s for
    `seconds`, its Content-Length promising more: the status it got."""
    length = int(rate * seconds * 2)
    s = socket.create_connection(("127.0.0.1", port), timeout=seconds + 60, source_address=(source, 0))
    s.sendall(f"POST /api/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Session: {sid}"
              f"\r\nContent-Length: {length}\r\n\r\n".encode())
    s.settimeout(0.1)
    end, got = time.time() + seconds, b""
    while time.time() < end and b"HTTP/1.1" not in got:
        try:
            s.sendall(b" " * (rate // 10))
        except OSError:
            break
        try:
            got += s.recv(4096)
        except (TimeoutError, OSError):
            pass
        time.sleep(0.1)
    s.settimeout(30)
    while b"\r\n" not in got:
        try:
            chunk = s.recv(4096)
        except OSError:
            break
        if not chunk:
            break
        got += chunk
    s.close()
    return int(got.split()[1]) if got.startswith(b"HTTP/1.1") else 0


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
    ap.add_argument("--trickle-s", type=float, default=70, help="how long the trickled uploads go on (deadline 60 s)")
    args = ap.parse_args()
    from qilin_lite.serve.web_app import MAX_DECODED_BYTES, MAX_KEPT_BYTES, MAX_REQUEST_BYTES, MAX_UPLOAD_BYTES

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
        threads = [threading.Thread(target=lambda s=s, i=i: codes.append(post(port, "/api/image", body, s,
                                                                           source=f"127.0.0.{i + 2}")[0]))
                   for i, s in enumerate(sids)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        phases.append(("4 clients x 64 MB bodies at once", codes, time.time() - t0, rss(server.pid)))

        # 2. composites: the old attack, then the largest the budget admits, asked about
        sid = session()
        t0 = time.time()
        attack = [{"name": f"{i}.png", "data": base64.b64encode(grey_png(9400)).decode()} for i in range(4)]
        codes = [post(port, "/api/image", json.dumps({"files": attack}).encode(), sid)[0]]
        side = largest_composite_side()
        fits = [{"name": f"{i}.png", "data": base64.b64encode(grey_png(side)).decode()} for i in range(4)]
        codes.append(post(port, "/api/image", json.dumps({"files": fits}).encode(), sid)[0])
        codes.append(post(port, "/api/ask", json.dumps({"question": "病灶位于哪一侧？"}).encode(), sid)[0])
        phases.append((f"4 x 9400^2 PNGs joined; 4 x {side}^2 (the budget's largest) + a question", codes,
                       time.time() - t0, rss(server.pid)))

        # 3. deflate bombs
        t0 = time.time()
        codes = []
        for mb in (512, 2048):
            bomb = base64.b64encode(deflate_bomb(work / f"bomb{mb}.dcm", mb * MB)).decode()
            codes.append(post(port, "/api/image", json.dumps({"files": [{"name": "b.dcm", "data": bomb}]}).encode(),
                              sid)[0])
        phases.append(("deflated DICOMs: 8x8 declared, 512 MB / 2 GB of pixels", codes, time.time() - t0,
                       rss(server.pid)))

        # 4. the largest decodable image, more tabs than the cap keeps, each asking
        png = base64.b64encode(largest_png()).decode()
        body = json.dumps({"files": [{"name": "big.png", "data": png}]}).encode()
        codes = []
        t0 = time.time()
        for _ in range(args.tabs):
            sid = tab = session()
            codes.append(post(port, "/api/image", body, sid)[0])
            codes.append(post(port, "/api/ask", json.dumps({"question": "病灶位于哪一侧？"}).encode(), sid)[0])
        phases.append((f"{args.tabs} tabs x largest image ({MAX_DECODED_BYTES // MB} MB decoded) + a question",
                       sorted(set(codes)), time.time() - t0, rss(server.pid)))

        # 5. floods: sessions, half-sent headers, trickled uploads
        t0 = time.time()
        codes = sorted({post(port, "/api/session", b"")[0] for _ in range(1000)})
        phases.append(("1,000 sessions", codes, time.time() - t0, rss(server.pid)))
        t0 = time.time()
        half = []
        for _ in range(3000):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ")
                half.append(s)
            except OSError:
                pass
        t1 = time.time()
        code = get(port, "/api/info")
        phases.append((f"3,000 half-sent headers; then a GET in {time.time() - t1:.2f} s", [code], time.time() - t0,
                       rss(server.pid)))
        for s in half:
            s.close()
        t0 = time.time()
        codes = []
        threads = [threading.Thread(target=lambda: codes.append(trickle(port, session(), 70 * 1024, args.trickle_s)))
                   for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1)
        t1 = time.time()
        codes.append(post(port, "/api/image", json.dumps({"files": fits[:1]}).encode(), session())[0])
        waited = time.time() - t1
        for t in threads:
            t.join()
        phases.append((f"4 uploads at 70 KB/s from one client (another's meanwhile: {waited:.1f} s)", sorted(codes),
                       time.time() - t0, rss(server.pid)))

        # 6. largest questions, to the last tab (its image is kept)
        sid = tab
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
              f"(kept-images cap {MAX_KEPT_BYTES // MB} MB, one image <= {MAX_DECODED_BYTES // MB} MB decoded, one "
              f"upload <= {MAX_REQUEST_BYTES // MB} MB on its way to the model)")
        log_bytes = (work / "server.log").stat().st_size
        print(f"server log: {log_bytes:,} bytes")
    finally:
        server.terminate()
        server.wait(timeout=30)
        log = (work / "server.log").read_text(errors="replace")
        if "Traceback" in log:
            print("server log has a traceback:\n" + log[-3000:])


if __name__ == "__main__":
    main()
