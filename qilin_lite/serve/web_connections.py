"""Connections and logs of `qilin-lite web` under a flood: what uvicorn itself does not bound.

- Open connections: at most `MAX_CONNECTIONS` (well below the process's file limit) and `MAX_CONNECTIONS_PER_CLIENT`
  per remote address. When a new connection would pass a cap, the one that has waited longest for its request
  headers is closed (the client's own first), so half-sent headers cannot keep a normal request out; only when every
  connection is busy with a request is the new one closed. 21,000 half-sent headers once used up the file limit: a
  normal GET timed out, and asyncio logged every failed accept (2.65 million lines in 30 s).
- Request headers must be complete `HEADER_TIMEOUT_S` after a connection opens or its last answer ends.
- Logging: the same message at most `LOG_BURST` times a minute (`RateLimited`, on every handler of the server's
  logging configuration, root included), then one line saying how many were left out.

Written against uvicorn 0.55's `H11Protocol` (its `connection_made`, `data_received`, `on_response_complete`,
`connection_lost`, `cycle`, `client`, `transport`); `guarded_protocol` fails with one line on a uvicorn without them.
"""

from __future__ import annotations

import copy
import logging
import resource
import time

from ..errors import UserError

HEADER_TIMEOUT_S = 10.0
MAX_CONNECTIONS_PER_CLIENT = 64  # a browser opens 6 per host; on 127.0.0.1 every local client shares this
LOG_BURST = 10
LOG_KEYS = 512  # distinct messages the limiter remembers (it must not grow under attack either)


def max_connections() -> int:
    """Well below the file limit: the rest is for the model's files, sockets being closed, the log."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(16, min(512, (soft if soft != resource.RLIM_INFINITY else 4096) // 2 - 32))


class ConnectionTable:
    """The server's open connections, by client, oldest first; which to close when a cap is reached."""

    def __init__(self, total: int | None = None, per_client: int = MAX_CONNECTIONS_PER_CLIENT):
        self.total, self.per_client = total or max_connections(), per_client
        self.open: dict = {}  # protocol -> (client address, when it began waiting for headers or None if busy)
        self.refused = 0

    def admit(self, conn, client: str) -> None:
        """Register `conn`; close whichever connection the caps say (possibly `conn` itself)."""
        self.open[conn] = (client, time.monotonic())
        mine = [c for c, (who, _) in self.open.items() if who == client]
        for crowd, cap in ((mine, self.per_client), (list(self.open), self.total)):
            while len(crowd) > cap:
                waiting = [c for c in crowd if self.open[c][1] is not None]
                victim = min(waiting, key=lambda c: self.open[c][1]) if waiting else conn
                self.drop(victim)
                crowd.remove(victim)
                victim.transport.close()
                self.refused += 1
                if victim is conn:
                    return

    def busy(self, conn) -> None:
        if conn in self.open:
            self.open[conn] = (self.open[conn][0], None)

    def waiting(self, conn) -> None:
        if conn in self.open:
            self.open[conn] = (self.open[conn][0], time.monotonic())

    def drop(self, conn) -> None:
        self.open.pop(conn, None)


def guarded_protocol(table: ConnectionTable, header_timeout_s: float = HEADER_TIMEOUT_S):
    """uvicorn's h11 protocol with the table's caps and a deadline for each request's headers."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    needed = ("connection_made", "data_received", "on_response_complete", "connection_lost")
    if not all(hasattr(H11Protocol, n) for n in needed):
        raise UserError("this uvicorn's h11 protocol lacks the hooks qilin-lite web bounds connections with; "
                        'install the version pyproject names: pip install -e ".[web]"')

    class Guarded(H11Protocol):
        deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm()
            table.admit(self, (self.client or ("?",))[0])

        def arm(self) -> None:
            self.disarm()
            self.deadline = self.loop.call_later(header_timeout_s, self.too_slow)

        def disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def awaiting_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def too_slow(self) -> None:
            if self.awaiting_headers() and not self.transport.is_closing():
                table.drop(self)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self.awaiting_headers():  # a request's headers are in: it runs as long as it needs
                self.disarm()
                table.busy(self)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            table.waiting(self)
            self.arm()

        def connection_lost(self, exc) -> None:
            self.disarm()
            table.drop(self)
            super().connection_lost(exc)

    return Guarded


class RateLimited(logging.Filter):
    """Lets the same message (logger and format string) through `burst` times a minute; the first one after a
    quiet spell says how many were left out. Remembers at most LOG_KEYS messages."""

    def __init__(self, burst: int = LOG_BURST, window_s: float = 60.0):
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self.seen: dict = {}  # key -> [window start, passed, left out]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg if isinstance(record.msg, str) else type(record.msg).__name__)
        now = time.monotonic()
        entry = self.seen.pop(key, None) or [now, 0, 0]
        if now - entry[0] >= self.window_s:
            if entry[2]:
                record.msg = f"{record.msg} [{entry[2]} more like this in the last minute were left out]"
            entry = [now, 0, 0]
        entry[1] += 1
        passed = entry[1] <= self.burst
        if not passed:
            entry[2] += 1
        self.seen[key] = entry  # most recent last
        while len(self.seen) > LOG_KEYS:
            self.seen.pop(next(iter(self.seen)))
        return passed


def log_config() -> dict:
    """uvicorn's logging configuration with RateLimited on every handler, and the root logger (asyncio's accept
    errors, our own modules) sent through them too."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["limit"] = {"()": RateLimited}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("limit")
    config["root"] = {"handlers": ["default"], "level": "WARNING"}
    return config
