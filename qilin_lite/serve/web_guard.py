"""Who may talk to `qilin-lite web`. Loopback is no security boundary: any web page the user opens can send requests
to 127.0.0.1, and a page on a domain that re-points its DNS to 127.0.0.1 (DNS rebinding) can read the answers.

- Host: only the names this server was started for (loopback names and the bound address, plus `--allow-host`):
  a rebinding page's requests carry its own domain as Host and are refused.
- Origin: a browser names the page a request comes from; only the same names may call the API, so another site's
  page cannot post images or questions.
- Token: off loopback the API needs the token shown once in the banner (header `X-Token`, or the `qilin_token`
  cookie the page sets from the address it was opened with), unless the operator says `--no-auth` on purpose.
- Every response forbids framing (`frame-ancestors 'none'`, X-Frame-Options) and content sniffing.
- Uploads are read one at a time, so a client that trickles its body would hold everyone else's upload: after a
  grace period the body must keep arriving at a minimum rate (`read_body_in_time`), or the upload is refused (408).
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")
HEADERS = {"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-store"}


def is_loopback(host: str) -> bool:
    try:
        return host in LOOPBACK or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hostname(value: str) -> str:
    """A Host header or an Origin's network location -> the lower-case host name alone (no port, no brackets)."""
    try:
        return (urlsplit(f"//{value}").hostname or "").lower()
    except ValueError:
        return ""


def allowed_hosts(bound: str, extra: list[str] | None = None) -> set[str]:
    names = set(LOOPBACK) | {hostname(h) for h in (extra or [])}
    if bound in ("0.0.0.0", "::", ""):  # every interface: this machine's own names, the rest by --allow-host
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    else:
        names.add(hostname(bound))
    return {n for n in names if n}


@dataclass
class Guard:
    hosts: set[str]
    token: str | None = None
    max_body: int | None = None  # bytes an upload's body may have, judged from its Content-Length before reading it
    upload_paths: tuple[str, ...] = ("/api/image",)
    max_small_body: int = 64 * 2**10  # any other POST: a question (20,000 Chinese characters) and its settings

    def refuse(self, path: str, headers, cookies, method: str = "GET") -> tuple[int, str] | None:
        """(status, message) for a request this server must not answer; None to let it through."""
        if hostname(headers.get("host", "")) not in self.hosts:
            return 403, ("this server answers only to " + ", ".join(sorted(self.hosts)) +
                         "; open it by one of those names (qilin-lite web --allow-host NAME adds one)")
        origin = headers.get("origin")
        if origin is not None and hostname(urlsplit(origin).netloc if "://" in origin else "") not in self.hosts:
            return 403, "requests from other sites' pages are refused"
        if self.max_body is not None and method == "POST":
            length = headers.get("content-length")
            if length is None or not length.isdigit():
                return 411, "send the request with its Content-Length (the page does)"
            if path in self.upload_paths and int(length) > self.max_body:
                return 413, (f"the upload is {int(length) / 2**20:.0f} MB; this server takes "
                             f"{self.max_body / 2**20:.0f} MB per request (64 MB of files): downscale or send fewer")
            if path not in self.upload_paths and int(length) > self.max_small_body:
                return 413, (f"the request is {int(length) / 2**10:.0f} KB; questions and settings may have "
                             f"{self.max_small_body // 2**10} KB: shorten the question")
        if self.token and path.startswith("/api/"):
            given = headers.get("x-token") or cookies.get("qilin_token") or ""
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return 401, "this server needs its token: open the address the server printed (with #token=...)"
        return None


UPLOAD_GRACE_S = 10.0  # an upload may start slowly (connection set-up, a busy browser)
MIN_UPLOAD_BYTES_PER_S = 64 * 2**10  # then it must average at least this: 512 kbit/s, a slow link, not a stall


async def read_body_in_time(request) -> str | None:
    """Read `request`'s body (Starlette caches it for the endpoint) while the bytes received keep up with
    `MIN_UPLOAD_BYTES_PER_S` after `UPLOAD_GRACE_S`. None when read; otherwise the message to answer with."""
    import asyncio

    loop = asyncio.get_running_loop()
    start, chunks, got = loop.time(), [], 0
    stream = request.stream()
    try:
        while True:
            # the moment the bytes so far stop covering the minimum rate: the next chunk must come before it
            wait = start + UPLOAD_GRACE_S + got / MIN_UPLOAD_BYTES_PER_S - loop.time()
            try:
                chunk = await asyncio.wait_for(anext(stream), max(wait, 0.0))
            except StopAsyncIteration:
                break
            chunks.append(chunk)
            got += len(chunk)
    except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
        return (f"the upload stalled ({got / 2**10:.0f} KB in {loop.time() - start:.0f} s; this server needs "
                f"{MIN_UPLOAD_BYTES_PER_S // 2**10} KB/s after {UPLOAD_GRACE_S:.0f} s); send the files again")
    finally:
        await stream.aclose()
    request._body = b"".join(chunks)  # what Request.body() would have kept; the endpoint reads it from there
    return None
