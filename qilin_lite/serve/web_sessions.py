"""The tabs of `qilin-lite web` and whose answer runs next, fair between clients and between tabs.

- `Sessions`: one `Session` per tab, issued by the server, at most `MAX_SESSIONS` and `MAX_SESSIONS_PER_CLIENT` per
  client (remote address, and the token where one is used). A client at its cap gets a new tab by pushing out one
  of its own: first a tab that never got an image, then its least recently used one idle for `OWN_IDLE_S`; another
  client's tab only after `IDLE_EVICT_S` idle. 64 sessions posted in 0.07 s once locked every new tab out for 30
  minutes; now they push out only each other.
- `Turns`: one model, one answer at a time, in the order asked but alternating between clients, and at most one
  waiting or running per tab: a tab's queue cannot starve another's.
- `Refused`: a refusal the page shows in its status line, its message in English and Chinese.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

MAX_SESSIONS = 64
MAX_SESSIONS_PER_CLIENT = 16
IDLE_EVICT_S = 30 * 60  # another client's tab may be pushed out only when idle this long: none can evict an active one
OWN_IDLE_S = 120  # a client's own tab with a conversation, when the client opens more than its cap


class Refused(UserError):
    """A limit said no: HTTP `status`, the message in English (`str`) and Chinese (`zh`, the page's first language)."""

    status = 429

    def __init__(self, message: str, zh: str, status: int | None = None):
        super().__init__(message)
        self.zh = zh
        self.status = status or self.status


class SessionGone(Refused):
    """HTTP 410: the page gets a new session and sends again."""

    status = 410


class TooManyTabs(Refused):
    """HTTP 429."""


@dataclass(eq=False)  # a tab is itself: the queue finds it by identity
class Session:
    chat: object  # chat.ChatSession with this tab's image and history
    client: str = ""
    stop: threading.Event = field(default_factory=threading.Event)
    used: float = field(default_factory=time.time)
    transcript: Path | None = None
    busy: bool = False  # answering now: its image is never let go
    released: bool = False  # its image was let go to make room for other tabs

    def kept_bytes(self) -> int:
        """What this tab holds in memory: the decoded image and the conversation's text."""
        pixels = sum(img.width * img.height * len(img.getbands()) for img in self.chat.images)
        return pixels + sum(len(m["content"].encode()) for m in self.chat.history)

    def empty(self) -> bool:
        return not self.chat.images and not self.chat.history and not self.released


class Sessions(dict):
    """Session id -> Session, with the caps and the eviction order above; `lock` guards every change."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def add(self, session: Session) -> str:
        with self.lock:
            now = time.time()
            mine = [k for k, s in self.items() if s.client == session.client]
            if len(mine) >= MAX_SESSIONS_PER_CLIENT or len(self) >= MAX_SESSIONS:
                own = [k for k in mine if not self[k].busy and (self[k].empty() or now - self[k].used >= OWN_IDLE_S)]
                others = [k for k, s in self.items() if s.client != session.client and not s.busy
                          and now - s.used >= IDLE_EVICT_S]
                pool = own if len(mine) >= MAX_SESSIONS_PER_CLIENT else own + others
                if not pool:
                    raise self.refusal(len(mine) >= MAX_SESSIONS_PER_CLIENT)
                del self[min(pool, key=lambda k: (not self[k].empty(), self[k].used))]
            sid = secrets.token_urlsafe(24)
            self[sid] = session
        return sid

    @staticmethod
    def refusal(mine: bool) -> TooManyTabs:
        """What a full server (`mine`: this client at its cap) answers, in English and Chinese."""
        if mine:
            return TooManyTabs(
                f"{MAX_SESSIONS_PER_CLIENT} tabs of yours are in use on this server; close one, or try again in "
                f"{OWN_IDLE_S // 60} minutes",
                f"您在此服务器上已有 {MAX_SESSIONS_PER_CLIENT} 个正在使用的标签页；请关闭一个，或 {OWN_IDLE_S // 60} 分钟后再试")
        return TooManyTabs(
            f"{MAX_SESSIONS} tabs are in use on this server; try again when one has been idle for "
            f"{IDLE_EVICT_S // 60} minutes",
            f"此服务器上已有 {MAX_SESSIONS} 个正在使用的标签页；请等其中一个空闲 {IDLE_EVICT_S // 60} 分钟后再试")


class Turns:
    """Whose answer runs next. `enter(session)` joins the queue (a tab already in it is refused), `wait` blocks
    until it is that tab's turn (False if its stop was set first), `leave` ends the turn."""

    def __init__(self):
        self.cond = threading.Condition()
        self.queue: list[Session] = []  # waiting, in the order asked
        self.running: Session | None = None
        self.last_client: str | None = None

    def enter(self, s: Session) -> None:
        with self.cond:
            if s in self.queue or s is self.running:
                raise Refused("this tab is already waiting for an answer; wait for it or press Stop",
                              "此标签页已有一个问题在等待回答；请等待或点击“停止”", status=409)
            self.queue.append(s)

    def _next(self) -> Session | None:
        # the first waiting tab of another client than the one just served: clients take turns
        return next((q for q in self.queue if q.client != self.last_client), self.queue[0] if self.queue else None)

    def wait(self, s: Session, on_place=None) -> bool:
        shown = None
        with self.cond:
            while True:
                if s.stop.is_set():
                    self.queue.remove(s)
                    self.cond.notify_all()
                    return False
                if self.running is None and self._next() is s:
                    self.queue.remove(s)
                    self.running, self.last_client = s, s.client
                    return True
                place = (self.running is not None) + self.queue.index(s)
                if on_place is not None and place != shown:
                    on_place(place)
                    shown = place
                self.cond.wait(timeout=0.1)  # also wakes for a Stop pressed while waiting

    def leave(self, s: Session) -> None:
        with self.cond:
            if self.running is s:
                self.running = None
            self.cond.notify_all()
