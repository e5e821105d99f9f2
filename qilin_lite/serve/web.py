"""`qilin-lite web`: one local page to try a trained model on medical images (clinicians need no terminal).

In:  any output directory `chat` accepts (align, lora/qlora, merged, full, converted release), served on
     127.0.0.1 unless `--host` says otherwise. The page itself is `web_page.html`: no CDN, font or analytics request,
     so it works with no network at all.
Out: answers streamed to the page; with `--log-dir`, one transcript per conversation (images only as the model's PNG
     view, never the uploaded file).

Each browser tab is a session (an id kept in the tab) with its own image and history. One model, so generation
requests queue behind one lock; a waiting request is told its place. Uploads are decoded by the code `chat` uses
(`load_chat_image`: DICOM windowing, 16-bit, composites) from memory with no name on disk (uploads.py). No DICOM
header value is read into anything the page, the server log or a transcript receives: only pixels leave the decoder.
Who may call it and how much memory a request may cost: web_guard.py and the README's security model.
"""

# no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime, and the classes
# they name are imported inside create_app

import asyncio
import base64
import io
import json
import logging
import queue
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from ..heap import release_freed_memory
from ..options import Attn, Dtype, Load4bit, Load8bit, ModelDir, dtype_arg, quant_bits
from .uploads import held, remove_stale
from .web_guard import HEADERS, Guard, allowed_hosts, is_loopback, read_body_in_time
from .web_input import WINDOWS, expect, sampling, window_setting

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 64 * 2**20  # the files of one upload, together
MAX_BODY_BYTES = MAX_UPLOAD_BYTES * 4 // 3 + 2**20  # their base64 and the JSON around it: refused from the header
MAX_KEPT_BYTES = 2**30  # what all tabs together keep (images, conversations); the least recently used go first
MAX_DECODED_BYTES = 128 * 2**20  # one image decoded (width x height x frames x bytes per sample), from its header
MAX_SESSIONS = 64
IDLE_EVICT_S = 30 * 60  # a new tab may push out only a tab idle this long: no client can evict an active one
SUFFIX = re.compile(r"\.(dcm|dicom|png|jpe?g|tiff?|bmp|webp|gif)$", re.IGNORECASE)


class SessionGone(UserError):
    """HTTP 410: the page reloads and gets a new session."""


class TooManyTabs(UserError):
    """HTTP 429."""


@dataclass
class Session:
    chat: object  # chat.ChatSession with this tab's image and history
    stop: threading.Event = field(default_factory=threading.Event)
    used: float = field(default_factory=time.time)
    transcript: Path | None = None
    busy: bool = False  # answering now: its image is never let go
    released: bool = False  # its image was let go to make room for other tabs

    def kept_bytes(self) -> int:
        """What this tab holds in memory: the decoded image and the conversation's text."""
        pixels = sum(img.width * img.height * len(img.getbands()) for img in self.chat.images)
        return pixels + sum(len(m["content"].encode()) for m in self.chat.history)


class WebApp:
    """The model, the sessions, the generation lock; plain methods the HTTP layer calls (and tests can)."""

    def __init__(self, generator, info, model_name: str, log_dir: Path | None = None):
        self.generator, self.info, self.model_name = generator, info, model_name
        self.log_dir = Path(log_dir) if log_dir else None
        self.sessions: dict[str, Session] = {}
        self.sessions_lock = threading.Lock()
        self.decoding = threading.Lock()  # one upload decoded at a time: a decode can take gigabytes
        self.lock = threading.Lock()  # one model: one generation at a time
        self.waiting = 0
        self.defaults = {"temperature": generator.temperature, "top_p": 1.0,
                         "max_new_tokens": generator.max_new_tokens}

    def new_session(self) -> str:
        """A new tab's session id, made here (a client never names its own, so it cannot reach another's)."""
        from .chat_session import ChatSession

        with self.sessions_lock:
            if len(self.sessions) >= MAX_SESSIONS:
                oldest = min(self.sessions, key=lambda k: self.sessions[k].used)
                if time.time() - self.sessions[oldest].used < IDLE_EVICT_S:
                    raise TooManyTabs(f"{MAX_SESSIONS} tabs are open on this server; close one, or try again when "
                                      "one has been idle for 30 minutes")
                del self.sessions[oldest]
            sid = secrets.token_urlsafe(24)
            self.sessions[sid] = Session(ChatSession(self.generator, name=self.model_name, kind=self.info.kind))
        return sid

    def session(self, sid: str) -> Session:
        if not re.fullmatch(r"[A-Za-z0-9_-]{16,64}", sid or ""):
            raise UserError("missing or malformed session id; reload the page")
        s = self.sessions.get(sid)
        if s is None:
            raise SessionGone("this tab's session has ended (the server restarted or closed it); reload the page")
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
        uploads = []
        for i, f in enumerate(files):
            name = str(f.get("name") or f"image{i}")
            if len(f.get("data") or "") > MAX_BODY_BYTES:  # (the HTTP layer already refused larger bodies)
                raise UserError(f"{name}: larger than {MAX_UPLOAD_BYTES // 2**20} MB; downscale it first")
            try:
                data = base64.b64decode(f.get("data") or "", validate=True)
            except ValueError:
                raise UserError(f"{name}: the upload arrived damaged; try again") from None
            if not data:
                raise UserError(f"{name}: empty file")
            m = SUFFIX.search(name)
            uploads.append((name, f"upload{i}{m.group(0).lower() if m else ''}", data))
        # in memory with no name on disk (uploads.py); one decode at a time bounds the server's peak memory
        with self.decoding, held([(neutral, data) for _, neutral, data in uploads]) as paths:
            try:
                images = load_chat_images(paths, t, window=window, frame=frame, max_bytes=MAX_DECODED_BYTES)
            except UserError as e:
                msg = str(e)
                # longest first: /proc/self/fd/1 must not rewrite part of /proc/self/fd/12
                for p, shown in sorted(((str(p), u[0]) for p, u in zip(paths, uploads)), key=lambda x: -len(x[0])):
                    msg = msg.replace(p, shown)
                raise UserError(msg) from None
        release_freed_memory()
        names = [Path(shown) for shown, _, _ in uploads]
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
        view.save(buf, format="PNG")
        png = buf.getvalue()
        if self.log_dir is not None:  # opted in: the model's view only, never the upload itself
            if s.transcript is None:
                s.transcript = self.log_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
                s.transcript.mkdir(parents=True, exist_ok=True)
            (s.transcript / ("image.png" if not add else f"image-{len(s.chat.images)}.png")).write_bytes(png)
        return {"preview": base64.b64encode(png).decode("ascii"), "width": view.width, "height": view.height,
                "images": len(s.chat.images)}

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
        events: queue.Queue = queue.Queue()
        s.stop.clear()

        class Pipe:  # ChatSession streams the answer into this, the HTTP response reads it
            def write(self, text):
                if text:
                    events.put({"text": text})

            def flush(self):
                pass

        def run():
            if not self.lock.acquire(blocking=False):  # another tab is generating: say so, then wait our turn
                self.waiting += 1
                events.put({"queued": self.waiting})
                self.lock.acquire()
                self.waiting -= 1
            try:  # holding the lock from here
                if s.stop.is_set():  # Stop pressed while waiting
                    events.put({"done": True, "stopped": True, "answer": ""})
                    return
                events.put({"started": True})
                s.busy = True
                g = self.generator
                g.temperature, g.top_p, g.max_new_tokens = temperature, top_p, max_new
                s.chat.stream = Pipe()
                answer = s.chat.regenerate(stop=s.stop) if regenerate else s.chat.ask(question.strip(), stop=s.stop)
                stopped = s.chat.last.stopped
                events.put({"done": True, "stopped": stopped, "answer": answer})
                self._log(s, stopped)
            except UserError as e:
                events.put({"error": str(e)})
            except Exception:  # noqa: BLE001 - a bug: logged here without the question or the image
                log.exception("generation failed")
                events.put({"error": "generation failed; see the server log"})
            finally:
                s.busy = False
                self.lock.release()
                events.put(None)

        threading.Thread(target=run, daemon=True).start()
        finished = False
        try:
            while (e := events.get()) is not None:
                yield e
            finished = True
        finally:  # the reader went away (a closed tab: the response stream is closed): stop, free the model
            if not finished:
                s.stop.set()

    def _log(self, s: Session, stopped: bool) -> None:
        if s.transcript is None or stopped:
            return
        rows = [{"role": m["role"], "content": m["content"]} for m in s.chat.history]
        (s.transcript / "transcript.json").write_text(json.dumps(
            {"model": self.model_name, "template": self.info.template, "messages": rows}, ensure_ascii=False,
            indent=1), encoding="utf-8")


def create_app(web: WebApp, guard: Guard | None = None):
    from fastapi import Body, FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    page = (Path(__file__).parent / "web_page.html").read_text(encoding="utf-8")
    guard = guard or Guard(allowed_hosts("127.0.0.1"), max_body=MAX_BODY_BYTES)

    # one upload read, parsed and decoded at a time: the others wait here with their bodies unread (uvicorn stops
    # reading a socket whose body nobody consumes), so N clients uploading at once cost one upload's memory, not N
    uploading = asyncio.Semaphore(1)

    @app.middleware("http")
    async def only_our_own(request: Request, call_next):
        refused = guard.refuse(request.url.path, request.headers, request.cookies, request.method)
        if refused:
            response = JSONResponse({"error": refused[1]}, status_code=refused[0])
        elif request.method == "POST" and request.url.path in guard.upload_paths:
            async with uploading:
                stalled = await read_body_in_time(request)
                response = JSONResponse({"error": stalled}, status_code=408, headers={"Connection": "close"}) \
                    if stalled else await call_next(request)
        else:
            response = await call_next(request)
        response.headers.update(HEADERS)
        return response

    def problem(e: UserError, status: int = 400):
        status = 410 if isinstance(e, SessionGone) else 429 if isinstance(e, TooManyTabs) else status
        return JSONResponse({"error": str(e)}, status_code=status)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse(page, headers={"Content-Security-Policy":
                                           "default-src 'self'; img-src 'self' data:; style-src 'unsafe-inline'; "
                                           "script-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'"})

    @app.post("/api/session")
    def new_session():
        try:
            return {"session": web.new_session()}
        except UserError as e:
            return problem(e)

    @app.get("/favicon.ico")
    def favicon():
        return Response(status_code=204)

    @app.get("/api/info")
    def info():
        return web.describe()

    # plain `def` endpoints: FastAPI runs them in its thread pool, so a long decode or a queued answer never blocks
    # the server (Stop must get through while another tab generates)
    @app.post("/api/image")
    def image(request: Request, body=Body(...)):
        try:
            body = expect(body, files=list, window=(str, list, int, float), frame=(int, str), add=bool)
            window = body.get("window")
            window = None if window in (None, "", "auto") else window_setting(window)
            frame = body.get("frame")
            frame = None if frame in (None, "") else int(frame)
            return web.set_image(request.headers.get("x-session", ""), body.get("files") or [], window, frame,
                                 add=bool(body.get("add")))
        except UserError as e:
            return problem(e)
        except (ValueError, TypeError, OverflowError):
            return problem(UserError("the upload could not be read; choose the files again"))

    @app.post("/api/ask")
    def ask(request: Request, body=Body(...)):
        sid = request.headers.get("x-session", "")
        try:
            body = expect(body, question=str, settings=dict, regenerate=bool)
            events = web.ask(sid, body.get("question"), body.get("settings") or {},
                             regenerate=bool(body.get("regenerate")))
            first = next(events)  # validation errors surface here, before the stream starts
        except UserError as e:
            return problem(e)
        except ValueError:
            return problem(UserError("malformed request; reload the page"))

        def stream():
            yield json.dumps(first, ensure_ascii=False) + "\n"
            for e in events:
                yield json.dumps(e, ensure_ascii=False) + "\n"

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    def session_action(method):
        def endpoint(request: Request):
            try:
                method(request.headers.get("x-session", ""))
            except UserError as e:
                return problem(e)
            return {"ok": True}

        return endpoint

    app.post("/api/stop")(session_action(web.stop))  # Stop: the tab's answer ends after the current token
    app.post("/api/clear")(session_action(web.clear))  # Clear: the tab's history, not its image

    return app


def serve(model: str, *, host: str = "127.0.0.1", port: int = 7860, bits: int | None = None,
          log_dir: Path | None = None, temperature: float = 0.2, max_new_tokens: int = 512,
          dtype: str | None = None, attn: str = "auto", allow_hosts: list[str] | None = None,
          token: str | None = None, no_auth: bool = False) -> None:
    import socket

    import uvicorn

    from .generate import load_generator
    from .chat_session import quiet

    if token is not None and not token.strip():  # `--token=` would otherwise turn authentication off unseen
        raise UserError("--token is empty; give a token, leave --token out (a random one off loopback), or pass "
                        "--no-auth to serve without one on purpose")
    for stale in remove_stale():  # upload folders of a server that died mid-decode (SIGKILL): nothing may stay
        log.warning("removed %s, left by a server that stopped while decoding an upload", stale)
    with socket.socket() as probe:  # before minutes of model loading, and before the banner names the address
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"{host}:{port}: cannot listen there ({e.strerror}); pick another --port") from None
    with quiet(False):
        generator, info = load_generator(model, bits=bits, dtype=dtype, attn=attn, temperature=temperature,
                                         max_new_tokens=max_new_tokens)
    exposed = not is_loopback(host)
    if token is None and exposed and not no_auth:  # reachable from other machines: a token unless refused on purpose
        token = secrets.token_urlsafe(18)
    guard = Guard(allowed_hosts(host, allow_hosts), token, MAX_BODY_BYTES)
    app = create_app(WebApp(generator, info, str(model), log_dir), guard)
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}/" + (f"#token={token}" if token else "")
    if exposed:
        print(f"warning: listening on {host}, not only this machine: anyone who can reach port {port} "
              + ("and has the token below can use the model" if token else "can use the model (--no-auth)")
              + f"; answers to host names {', '.join(sorted(guard.hosts))} (--allow-host adds one)", flush=True)
    print(f"qilin-lite web: {where}  (model {model}; {'transcripts in ' + str(log_dir) if log_dir else 'nothing is stored'})"
          "\n仅供研究，不构成医疗诊断 / for research only, not a diagnosis", flush=True)
    # access_log off: request lines carry nothing private, but there is no need to keep them either
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


def register(app: typer.Typer) -> None:
    @app.command("web")
    def web_command(
        model: ModelDir,
        host: Annotated[str, typer.Option("--host", help="address to listen on (default: this machine only)")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port")] = 7860,
        load_4bit: Load4bit = False,
        load_8bit: Load8bit = False,
        log_dir: Annotated[Optional[Path], typer.Option("--log-dir", help="save transcripts here (images as the model's PNG view); default: nothing is stored")] = None,
        temperature: Annotated[float, typer.Option("--temperature", help="the page's default (0 = greedy)")] = 0.2,
        max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="the page's default")] = 512,
        allow_host: Annotated[Optional[list[str]], typer.Option("--allow-host", help="another host name the page may be opened by (repeatable); default: loopback names and --host")] = None,
        token: Annotated[Optional[str], typer.Option("--token", help="the token the API requires (default off loopback: a random one, printed once)")] = None,
        no_auth: Annotated[bool, typer.Option("--no-auth", help="off loopback, serve without a token (anyone who can reach the port can use the model)")] = False,
        dtype: Dtype = "auto",
        attn: Attn = "auto",
    ):
        """A local web page to try a model on images (DICOM windows, Chinese/English). Not a diagnosis."""
        import importlib.util

        bits = quant_bits(load_4bit, load_8bit)
        if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
            raise UserError('qilin-lite web needs FastAPI and uvicorn: pip install -e ".[web]"')
        serve(model, host=host, port=port, bits=bits, log_dir=log_dir,
              temperature=temperature, max_new_tokens=max_new_tokens, dtype=dtype_arg(dtype), attn=attn,
              allow_hosts=allow_host, token=token, no_auth=no_auth)
