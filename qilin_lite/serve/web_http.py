"""The HTTP layer of `qilin-lite web`: FastAPI routes over a WebApp (web_app.py), behind the guard (web_guard.py).

In:  requests from the page (web_page.html); Out: JSON answers, an NDJSON stream per answer, the page itself.
A refusal is a status and `{"error": message}`, never a traceback.
"""

# no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime, and the classes
# they name are imported inside create_app

import asyncio
import json
from pathlib import Path

from ..errors import UserError
from .web_app import MAX_BODY_BYTES, SessionGone, TooManyTabs, WebApp
from .web_guard import HEADERS, Guard, allowed_hosts, read_body_in_time
from .web_input import expect, window_setting


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


