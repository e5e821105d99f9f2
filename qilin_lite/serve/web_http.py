"""The HTTP layer of `qilin-lite web`: FastAPI routes over a WebApp (web_app.py), behind the guard (web_guard.py).

In:  requests from the page (web_page.html); Out: JSON answers, an NDJSON stream per answer, the page itself.
A refusal is a status and `{"error": message, "zh": 中文}` (the page shows it in its status line), never a traceback.
A client is its remote address and, where the server has one, the token it sent: sessions, uploads and connections
are capped per client (web_sessions.py, web_guard.UploadSlots, web_connections.py).
"""

# no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime, and the classes
# they name are imported inside create_app

import contextlib
import json
from pathlib import Path

from ..errors import UserError
from .web_app import MAX_BODY_BYTES, WebApp
from .web_guard import HEADERS, Guard, UploadSlots, allowed_hosts, read_body_in_time
from .web_input import expect, window_setting
from .web_sessions import Refused


def client_of(scope, headers, cookies) -> str:
    """Who is asking: the remote address, and the token where one is sent (on 127.0.0.1 every local user is one
    address; the per-tab rules of web_sessions.py keep them fair to each other)."""
    addr = (scope.get("client") or ("?",))[0]
    token = headers.get("x-token") or cookies.get("qilin_token") or ""
    return f"{addr} {token}" if token else addr


class Guarded:
    """Plain ASGI in front of the routes (no BaseHTTPMiddleware: a closed tab's disconnect must reach the answer's
    stream at once): the guard's refusals, one upload slot per client, each upload's body read in time."""

    def __init__(self, app, guard: Guard, uploads: UploadSlots):
        self.app, self.guard, self.uploads = app, guard, uploads

    async def __call__(self, scope, receive, send):
        from starlette.datastructures import Headers
        from starlette.requests import cookie_parser

        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + \
                    [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]
            await send(message)

        headers = Headers(scope=scope)
        cookies = cookie_parser(headers.get("cookie", ""))
        refused = self.guard.refuse(scope["path"], headers, cookies, scope["method"])
        if refused:
            return await answer(secured, refused[0], {"error": refused[1]})
        if scope["method"] != "POST" or scope["path"] not in self.guard.upload_paths:
            return await self.app(scope, receive, secured)
        try:
            async with self.uploads.turn(client_of(scope, headers, cookies)):
                body, message, zh = await read_body_in_time(receive)
                if body is None:
                    return await answer(secured, 408, {"error": message, "zh": zh}, close=True)
                given = False

                async def replay():  # the body once, then the real channel (a disconnect reaches the app)
                    nonlocal given
                    if not given:
                        given = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, secured)
        except Refused as e:
            await answer(secured, e.status, {"error": str(e), "zh": e.zh})


async def answer(send, status: int, payload: dict, close: bool = False) -> None:
    body = json.dumps(payload, ensure_ascii=False).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": body})


def create_app(web: WebApp, guard: Guard | None = None):
    from fastapi import Body, FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    page = (Path(__file__).parent / "web_page.html").read_text(encoding="utf-8")
    guard = guard or Guard(allowed_hosts("127.0.0.1"), max_body=MAX_BODY_BYTES)

    app.add_middleware(Guarded, guard=guard, uploads=UploadSlots())

    def problem(e: UserError, status: int = 400):
        if isinstance(e, Refused):
            return JSONResponse({"error": str(e), "zh": e.zh}, status_code=e.status)
        return JSONResponse({"error": str(e)}, status_code=status)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse(page, headers={"Content-Security-Policy":
                                           "default-src 'self'; img-src 'self' data:; style-src 'unsafe-inline'; "
                                           "script-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'"})

    @app.post("/api/session")
    def new_session(request: Request):
        try:
            return {"session": web.new_session(client_of(request.scope, request.headers, request.cookies))}
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

        async def stream():
            import anyio

            finished = False
            try:
                yield json.dumps(first, ensure_ascii=False) + "\n"
                # abandon_on_cancel: a closed tab cancels this at once, not after the next token
                while (e := await anyio.to_thread.run_sync(next, events, None, abandon_on_cancel=True)) is not None:
                    yield json.dumps(e, ensure_ascii=False) + "\n"
                finished = True
            finally:
                if not finished:  # the tab went away: its answer's stop is checked after every token
                    with contextlib.suppress(UserError):
                        web.stop(sid)

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


