"""Who may talk to `qilin-lite web`. Loopback is no security boundary: any web page the user opens can send requests
to 127.0.0.1, and a page on a domain that re-points its DNS to 127.0.0.1 (DNS rebinding) can read the answers.

- Host: only the names this server was started for (loopback names and the bound address, plus `--allow-host`):
  a rebinding page's requests carry its own domain as Host and are refused.
- Origin: a browser names the page a request comes from; only the same names may call the API, so another site's
  page cannot post images or questions.
- Token: off loopback the API needs the token shown once in the banner (header `X-Token`, or the `qilin_token`
  cookie the page sets from the address it was opened with), unless the operator says `--no-auth` on purpose.
- Every response forbids framing (`frame-ancestors 'none'`, X-Frame-Options) and content sniffing.
- Uploads are read a few at a time, one per client (`UploadSlots`), so a client that trickles its body would hold
  others' uploads: after a grace period the body must keep arriving at a minimum rate, and all of it within a
  deadline (`read_body_in_time`), or the upload is refused (408).
"""

from __future__ import annotations

import contextlib
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
UPLOAD_DEADLINE_S = 60.0  # and be all there within this: a steady 70 KB/s once held the one upload slot for minutes
UPLOAD_SLOTS = 2  # uploads read, parsed and decoded at once (bodies in memory), each from another client
MAX_UPLOADS_PER_CLIENT = 2  # one being read, one waiting; more are refused, not queued


class UploadSlots:
    """Whose upload is read next: at most UPLOAD_SLOTS at once and one per client, the others waiting in order with
    their bodies unread (uvicorn stops reading a socket whose body nobody consumes), so N clients uploading at once
    cost two uploads' memory, not N; a client may have MAX_UPLOADS_PER_CLIENT in the building."""

    def __init__(self, slots: int = UPLOAD_SLOTS, per_client: int = MAX_UPLOADS_PER_CLIENT):
        self.slots, self.per_client = slots, per_client
        self.holding: set[str] = set()
        self.count: dict[str, int] = {}
        self.cond = None  # made inside the server's event loop

    @contextlib.asynccontextmanager
    async def turn(self, client: str):
        import asyncio

        from .web_sessions import Refused

        if self.count.get(client, 0) >= self.per_client:
            raise Refused(f"{self.per_client} uploads of yours are already being read or waiting; wait for them",
                          f"您已有 {self.per_client} 个上传正在读取或排队；请等待其完成后再试")
        self.cond = self.cond or asyncio.Condition()
        self.count[client] = self.count.get(client, 0) + 1
        try:
            async with self.cond:
                await self.cond.wait_for(lambda: len(self.holding) < self.slots and client not in self.holding)
                self.holding.add(client)
            try:
                yield
            finally:
                async with self.cond:
                    self.holding.discard(client)
                    self.cond.notify_all()
        finally:
            self.count[client] -= 1
            if not self.count[client]:
                del self.count[client]


async def read_body_in_time(receive) -> tuple[bytes | None, str | None, str | None]:
    """Read an ASGI request's body while the bytes received keep up with `MIN_UPLOAD_BYTES_PER_S` after
    `UPLOAD_GRACE_S`, and all of it within `UPLOAD_DEADLINE_S`. (body, None, None) when read; otherwise (None, the
    message to answer with, in English and Chinese)."""
    import asyncio

    loop = asyncio.get_running_loop()
    start, chunks, got, more = loop.time(), [], 0, True
    try:
        while more:
            # the moment the bytes so far stop covering the minimum rate, or the deadline: the next chunk comes first
            wait = min(start + UPLOAD_GRACE_S + got / MIN_UPLOAD_BYTES_PER_S, start + UPLOAD_DEADLINE_S) - loop.time()
            message = await asyncio.wait_for(receive(), max(wait, 0.0))
            if message["type"] == "http.disconnect":
                return None, "the upload was cut off; send the files again", "上传中断；请重新发送文件"
            chunks.append(message.get("body", b""))
            got += len(chunks[-1])
            more = message.get("more_body", False)
    except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
        took = loop.time() - start
        if took >= UPLOAD_DEADLINE_S - 0.05:
            return None, (f"the upload took longer than {UPLOAD_DEADLINE_S:.0f} s ({got / 2**20:.1f} MB arrived); "
                          "send fewer or smaller files, or from a faster link"), \
                f"上传超过 {UPLOAD_DEADLINE_S:.0f} 秒仍未完成（已收到 {got / 2**20:.1f} MB）；请减少或缩小文件后重试"
        return None, (f"the upload stalled ({got / 2**10:.0f} KB in {took:.0f} s; this server needs "
                      f"{MIN_UPLOAD_BYTES_PER_S // 2**10} KB/s after {UPLOAD_GRACE_S:.0f} s); send the files again"), \
            f"上传停滞（{took:.0f} 秒内只收到 {got / 2**10:.0f} KB）；请重新发送文件"
    return b"".join(chunks), None, None
