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
The pieces: web_app.py (images, answers), web_sessions.py (tabs, whose answer is next), web_http.py (routes),
web_guard.py (who may call it, uploads' size and pace), web_connections.py (connections and logs under a flood),
web_input.py (what a request may contain); the README's security model.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from ..options import Attn, Dtype, Load4bit, Load8bit, ModelDir, dtype_arg, quant_bits
from .uploads import remove_stale
from .web_guard import Guard, allowed_hosts, is_loopback

log = logging.getLogger(__name__)


def serve(model: str, *, host: str = "127.0.0.1", port: int = 7860, bits: int | None = None,
          log_dir: Path | None = None, temperature: float = 0.2, max_new_tokens: int = 512,
          dtype: str | None = None, attn: str = "auto", allow_hosts: list[str] | None = None,
          token: str | None = None, no_auth: bool = False) -> None:
    import socket

    import uvicorn

    from .chat_session import quiet
    from .generate import load_generator
    from .web_app import MAX_BODY_BYTES, WebApp
    from .web_connections import ConnectionTable, guarded_protocol, log_config
    from .web_http import create_app

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
    # access_log off: request lines carry nothing private, but there is no need to keep them either; connections
    # capped per client with a deadline for their headers, and every log line rate-limited (web_connections.py)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                http=guarded_protocol(ConnectionTable()), log_config=log_config())


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
