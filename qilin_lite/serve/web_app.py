"""The web page's state: one model, one ChatSession per tab, the generation lock; plain methods the HTTP layer
(web_http.py) calls and tests call directly.

In:  uploads as `{"name", "data": base64}`, questions and sampling settings, each with the tab's session id.
Out: the model's view of the images as a PNG, answers as events (`{"queued"}`, `{"text"}`, `{"done"}`).

What a request may cost is bounded before it costs it: the upload's body (web_guard.py), each image's decoded size
and the whole request's (all images, the composite, the padded view, the preview and the processor's copies, added
up from the headers: images/limits.py), and what all tabs keep (`MAX_KEPT_BYTES`, the least recently used let go).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import queue
import re
import threading
import time
import uuid
from pathlib import Path

from ..errors import UserError
from ..heap import release_freed_memory
from .uploads import in_memory
from .web_input import WINDOWS, sampling
from .web_sessions import Refused, Session, SessionGone, Sessions, Turns

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 64 * 2**20  # the files of one upload, together
MAX_BODY_BYTES = MAX_UPLOAD_BYTES * 4 // 3 + 2**20  # their base64 and the JSON around it: refused from the header
MAX_KEPT_BYTES = 2**30  # what all tabs together keep (images, conversations); the least recently used go first
MAX_DECODED_BYTES = 128 * 2**20  # one image decoded (width x height x frames x bytes per sample), from its header
# one upload's images on their way to the model, from their headers (images/limits.pipeline_bytes): four images that
# each pass MAX_DECODED_BYTES once joined into a 37600x37600 view and took the server past 11 GB
MAX_REQUEST_BYTES = 3 * 2**29  # 1.5 GiB: the largest image one decode takes (16-bit 8184x8184) fits, asked about

class WebApp:
    """The model, the sessions, the generation lock; plain methods the HTTP layer calls (and tests can)."""

    def __init__(self, generator, info, model_name: str, log_dir: Path | None = None):
        self.generator, self.info, self.model_name = generator, info, model_name
        self.log_dir = Path(log_dir) if log_dir else None
        self.sessions = Sessions()
        self.sessions_lock = self.sessions.lock
        self.decoding = threading.Lock()  # one upload decoded at a time: a decode can take gigabytes
        self.turns = Turns()  # whose answer runs next: one per tab, clients in turn
        self.lock = threading.Lock()  # one model: one generation at a time
        self.waiting = 0
        self.defaults = {"temperature": generator.temperature, "top_p": 1.0,
                         "max_new_tokens": generator.max_new_tokens}

    def new_session(self, client: str = "") -> str:
        """A new tab's session id, made here (a client never names its own, so it cannot reach another's).
        `client`: who asks (remote address and token): the caps and evictions of web_sessions.py are per client."""
        from .chat_session import ChatSession

        chat = ChatSession(self.generator, name=self.model_name, kind=self.info.kind)
        return self.sessions.add(Session(chat, client=client))

    def session(self, sid: str) -> Session:
        if not re.fullmatch(r"[A-Za-z0-9_-]{16,64}", sid or ""):
            raise UserError("missing or malformed session id; reload the page")
        s = self.sessions.get(sid)
        if s is None:
            raise SessionGone("this tab's session has ended (the server restarted or closed it); reload the page",
                              "此标签页的会话已结束（服务器已重启或已将其关闭）；请刷新页面")
        s.used = time.time()
        return s

    def describe(self) -> dict:
        from .chat_session import DISCLAIMER

        # names, never absolute paths: the page (and anyone who can reach it) learns nothing of the file system
        return {"model": Path(self.model_name).name, "kind": self.info.kind,
                "base": Path(self.info.base).name if self.info.base else None,
                "template": self.info.template, "image_mode": self.info.image_mode, "notice": DISCLAIMER,
                "images": {"max": self.generator.template.max_images, "mode": self.generator.template.multi_image},
                "defaults": self.defaults, "windows": {k: list(v) for k, v in WINDOWS.items()}}

    def set_image(self, sid: str, files: list[dict], window=None, frame: int | None = None, add: bool = False) -> dict:
        """Decode the uploads (`{"name", "data": base64}`) as chat does; returns the model's view as a PNG. `add`:
        more images for the next question of this conversation (chat's /add), else a new conversation."""
        from ..images.decode import expand_to_square, side_by_side
        from .chat_session import check_image_count, load_chat_images

        s = self.session(sid)
        t = self.generator.template
        if not files:
            raise UserError("choose an image first")
        if add:  # both before any upload is decoded
            s.chat.check_addable(len(files))
        else:
            check_image_count(len(files), t)
        uploads = in_memory(files, MAX_BODY_BYTES)
        # decoded from memory, never a name on disk (uploads.py); one decode at a time bounds the peak memory
        with self.decoding:
            self.check_cost(uploads, [u.name for u in uploads], frame, kept=s.chat.images if add else [])
            images = load_chat_images(uploads, t, window=window, frame=frame, max_bytes=MAX_DECODED_BYTES)
            del uploads  # the upload's bytes go as soon as its pixels exist
        release_freed_memory()
        names = [Path(str(f.get("name") or f"image{i}")[:200]) for i, f in enumerate(files)]
        if add:
            s.chat.add_loaded(images, names)
        else:
            s.chat.show(images, names)
            s.transcript = None
        s.released = False
        loader = self.generator.images  # the run's squaring rule and fill colour, as training and chat use them
        views = [expand_to_square(img, loader.fill) if loader.mode == "pad" else img for img in s.chat.images]
        view = views[0] if len(views) == 1 else side_by_side(views)  # separate images: shown in a row
        self.make_room(keep=s)
        release_freed_memory()
        buf = io.BytesIO()
        view.save(buf, format="PNG", compress_level=1)  # the same pixels; level 6 took 20 s for a noisy 5000x5000
        png = buf.getvalue()
        if self.log_dir is not None:  # opted in: the model's view only, never the upload itself
            if s.transcript is None:
                s.transcript = self.log_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
                s.transcript.mkdir(parents=True, exist_ok=True)
            (s.transcript / ("image.png" if not add else f"image-{len(s.chat.images)}.png")).write_bytes(png)
        return {"preview": base64.b64encode(png).decode("ascii"), "width": view.width, "height": view.height,
                "images": len(s.chat.images)}

    def check_cost(self, paths, names: list[str], frame: int | None, kept: list) -> int:
        """What these uploads (and the images the conversation keeps, when adding) would cost on their way to the
        model, added up from their headers before anything is decoded; over MAX_REQUEST_BYTES is one UserError."""
        from ..images.decode import image_header
        from ..images.limits import MB, Header, joined_size, pipeline_bytes

        headers = [Header(im.width, im.height, 0) for im in kept]
        headers += [image_header(p, frame=frame, max_bytes=MAX_DECODED_BYTES) for p in paths]
        joined = not self.generator.template.separate_images
        cost = pipeline_bytes(headers, joined=joined, pad=self.generator.images.mode == "pad")
        if cost > MAX_REQUEST_BYTES:
            sizes = ", ".join(f"{h.width}x{h.height}" for h in headers)
            view = " joined into {}x{}".format(*joined_size([(h.width, h.height) for h in headers])) \
                if joined and len(headers) > 1 else ""
            limit = f"{MAX_REQUEST_BYTES / MB:,.0f} MB"
            raise Refused(f"{', '.join(names)}: {sizes}{view} would take {cost / MB:,.0f} MB to decode and show to "
                          f"the model, above this server's {limit} per upload; downscale them or send fewer",
                          f"图像过大：解码并输入模型需要 {cost / MB:,.0f} MB，超过此服务器每次上传 {limit} 的上限；"
                          "请缩小图像或减少张数", status=413)
        return cost

    def make_room(self, keep: Session) -> int:
        """Let go of the least recently used tabs' images (and conversations) until everything kept fits in
        MAX_KEPT_BYTES; never `keep`'s or an answering tab's. Returns the bytes kept."""
        with self.sessions_lock:
            total = sum(s.kept_bytes() for s in self.sessions.values())
            for s in sorted(self.sessions.values(), key=lambda s: s.used):
                if total <= MAX_KEPT_BYTES:
                    break
                if s is keep or s.busy or s.chat.image is None:
                    continue
                total -= s.kept_bytes()
                s.chat.image, s.released = None, True
                s.chat.reset()
        return total

    def clear(self, sid: str) -> None:
        s = self.session(sid)
        s.chat.reset()

    def stop(self, sid: str) -> None:
        self.session(sid).stop.set()

    def ask(self, sid: str, question: str | None, settings: dict, regenerate: bool = False):
        """Yield events for one answer: {"queued": n} while waiting, {"text": ...} as it streams, then {"done"}."""
        s = self.session(sid)
        if not regenerate and not (question or "").strip():
            raise UserError("the question is empty")
        if s.chat.image is None:
            raise UserError("upload an image first" + (" again: this tab's image was let go to make room for "
                                                         "other tabs" if s.released else ""))
        if regenerate and len(s.chat.history) < 2:
            raise UserError("nothing to regenerate yet: ask a question first")
        temperature, top_p, max_new = sampling(settings, self.defaults)
        self.turns.enter(s)  # one waiting or running answer per tab (409 for a second)
        stop = s.stop = threading.Event()  # this answer's own: a later one's is never set by this one's end
        self.waiting += 1
        events: queue.Queue = queue.Queue()

        class Pipe:  # ChatSession streams the answer into this, the HTTP response reads it
            def write(self, text):
                if text:
                    events.put({"text": text})

            def flush(self):
                pass

        def turn() -> bool:
            """Wait for this tab's turn, then for the model; False when Stop came first (or the tab went away)."""
            try:
                if not self.turns.wait(s, on_place=lambda n: events.put({"queued": n})):
                    return False
                if not self.lock.acquire(blocking=False):  # the model is busy outside the queue (another caller)
                    events.put({"queued": 1})
                    while not self.lock.acquire(timeout=0.1):
                        if stop.is_set():
                            self.turns.leave(s)
                            return False
                if stop.is_set():  # Stop pressed while waiting
                    self.lock.release()
                    self.turns.leave(s)
                    return False
                return True
            finally:
                self.waiting -= 1

        def run():
            if not turn():
                events.put({"done": True, "stopped": True, "answer": ""})
                events.put(None)
                return
            last = None
            try:  # holding the turn and the model from here
                events.put({"started": True})
                s.busy = True
                g = self.generator
                g.temperature, g.top_p, g.max_new_tokens = temperature, top_p, max_new
                s.chat.stream = Pipe()
                # s.stop is the stopping criterion checked after every token: Stop, or the tab gone (web_http.py)
                answer = s.chat.regenerate(stop=stop) if regenerate else s.chat.ask(question.strip(), stop=stop)
                stopped = s.chat.last.stopped
                last = {"done": True, "stopped": stopped, "answer": answer}
                self._log(s, stopped)
            except UserError as e:
                last = {"error": str(e)}
            except Exception:  # noqa: BLE001 - a bug: logged here without the question or the image
                log.exception("generation failed")
                last = {"error": "generation failed; see the server log"}
            finally:
                s.busy = False
                self.lock.release()
                self.turns.leave(s)  # before the page hears "done", so its next question finds the tab free
                events.put(last)
                events.put(None)

        threading.Thread(target=run, daemon=True).start()
        finished = False
        try:
            while (e := events.get()) is not None:
                yield e
            finished = True
        finally:  # the reader went away (a closed tab: the response stream is closed): stop, free the model
            if not finished:
                stop.set()

    def _log(self, s: Session, stopped: bool) -> None:
        if s.transcript is None or stopped:
            return
        rows = [{"role": m["role"], "content": m["content"]} for m in s.chat.history]
        (s.transcript / "transcript.json").write_text(json.dumps(
            {"model": self.model_name, "template": self.info.template, "messages": rows}, ensure_ascii=False,
            indent=1), encoding="utf-8")


