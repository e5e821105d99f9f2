"""Answering a benchmark through a server (`eval --endpoint URL --served-model NAME`): any OpenAI-compatible
chat-completions server (vLLM, SGLang, llama.cpp's `llama-server`, `transformers serve`, Ollama).

- Each question is one user turn: its images as `image_url` parts (data URLs), then the question as a text part, in
  the order `chat` and training put them (images first). The server renders the prompt with its model's chat
  template; for a qilin-lite output directory that is the saved template, which gives chat's prompt ids.
- Every image is decoded by qilin-lite's own loader (DICOM windows, 16-bit grey, alpha, EXIF rotation) and sent as
  a lossless 8-bit RGB PNG: the server sees the pixels the in-process `eval` sees, and never a DICOM header.
- A server's processor only resizes (and centre-crops): with `--images-as RUN` (by default the served model itself
  where its name is a qilin-lite output directory here, as `transformers serve DIR` names it) each image is sent as
  that run saw it in training: padded to a square in its fill colour for a `pad` run, and a multi-image question
  (MMMU) as its composite for a composite template. Without one, images go as decoded, each on its own (what a
  native-resolution VLM's server wants).
- Greedy (temperature 0), `max_tokens` = --max-new-tokens; `--concurrency` requests in flight, answers kept in the
  benchmark's order. Everything answered before a failure is on disk (the run resumes from it); a server that is
  down, slow (--timeout) or answers something that is not a chat completion is one line.
- The protocol records the served model's name, what the server reports (its model id, its version where it has
  an endpoint for it: vLLM and SGLang `/version`, llama-server `/props`), and the decoding settings. The URL itself is
  recorded, but a resume may come back on another address (and the list of models it serves may change).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from ..errors import UserError
from .items import EvalItem
from .judge import endpoint as completions_address
from .judge import is_local
from .prompt import format_prompt

log = logging.getLogger(__name__)

API_KEY_ENV = "QILIN_ENDPOINT_API_KEY"  # for a hosted endpoint; never stored or printed
RETRIES = 2  # a 429 / 5xx / dropped connection mid-run is asked again this many times, after 1 s then 2 s


class PartialAnswers(UserError):
    """A batch stopped by the server: `answers` are the ones it gave, in order, before the failure."""

    def __init__(self, message: str, answers: list[str]):
        super().__init__(message)
        self.answers = answers


def base_url(url: str) -> str:
    """The server's root (no /v1, no /chat/completions), for its other endpoints."""
    url = url.rstrip("/")
    for tail in ("/chat/completions", "/v1"):
        if url.endswith(tail):
            url = url[: -len(tail)]
    return url


def check_flags(url: str, served_model: str, concurrency: int, timeout: float) -> None:
    """The endpoint flags, before any image is read or request sent."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--endpoint {url}: give the server's address, e.g. http://127.0.0.1:8000 (vLLM, "
                        "transformers serve) or http://127.0.0.1:8080 (llama-server)")
    if parts.username is not None or parts.password is not None or parts.query:
        # the address is written into protocol.json and the logs: a secret in it would be kept there
        raise UserError(f"--endpoint {parts.scheme}://{parts.hostname}...: the address holds credentials or a query; "
                        f"give the key in {API_KEY_ENV} (sent as a Bearer token) and the address alone")
    if concurrency < 1:
        raise UserError(f"--concurrency must be at least 1, got {concurrency}")
    if not timeout > 0:
        raise UserError(f"--timeout must be a positive number of seconds, got {timeout}")
    if not served_model or not served_model.strip():
        raise UserError("--served-model: name the model as the server knows it (GET /v1/models lists it)")


@dataclass(frozen=True)
class TrainedView:
    """How a run saw images in training (`--images-as RUN`): its template's multi-image rule, its image mode and
    the colour it padded with. A server's processor only resizes (and centre-crops), so a `pad` run's square
    padding and a composite template's composite are made here, as `qilin-lite image` makes them."""

    template: object
    mode: str
    fill: tuple[int, int, int]
    grid: object = None  # the run's loader where images go at its processor's size or grid (at_grid)

    @classmethod
    def of(cls, run: str) -> "TrainedView":
        from ..families import get_template
        from ..images.pixel_values import image_loader, pad_fill
        from ..model import RunInfo, load_tokenizer_and_processor, template_of

        if not Path(run).is_dir():
            raise UserError(f"--images-as {run}: not a directory; name the output directory the served model was "
                            "trained into (or merged from)")
        info = RunInfo.load(Path(run))
        processor = load_tokenizer_and_processor(run)[1]
        loader = image_loader(processor, info.image_mode if info else "pad")
        # the fill is also the blank image's colour (`--image-blind`): the processor's mean, as in-process eval has
        # it, for a native-resolution loader too (it pads nothing, so it has none of its own)
        fill = loader.fill or pad_fill(getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5))
        # beyond padding, images go at the processor's grid (Qwen) or fixed size (Gemma 3); CLIP's resize themselves
        return cls(get_template(template_of(run)), loader.mode, fill, None if loader.mode == "pad" else loader)

    def describe(self) -> dict:
        return {"template": self.template.name, "image_mode": self.mode, "fill": list(self.fill)}


def image_part(path: str, view: TrainedView | None = None) -> dict:
    """An `image_url` part holding the image as qilin-lite decodes it (and pads it, for a `pad` run; resizes it to
    the processor's grid or size, for a native-resolution or squashing one), as a PNG data URL."""
    from ..images.decode import expand_to_square, load_image

    image = load_image(path)
    if view is not None and view.mode == "pad":
        image = expand_to_square(image, view.fill)
    elif view is not None and view.grid is not None:  # as `qilin-lite image` writes it: llama.cpp pads, Qwen stretches
        image = view.grid.at_grid(image if image.mode == "RGB" else image.convert("RGB"))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}


def messages_for(item: EvalItem, instruction: str | None, view: TrainedView | None = None) -> list[dict]:
    """One user turn: the question's images, then its text. A multi-image question sends each image on its own,
    or, with a trained view, what that run's template showed (their composite for vicuna_v1)."""
    images = item.shown(view.template) if view is not None else list(item.parts) or ([item.image] if item.image else [])
    text = format_prompt(item, instruction)
    if not images:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [*(image_part(p, view) for p in images), {"type": "text", "text": text}]}]


class Client:
    """POST / GET against one server, each failure one UserError that names the address and the fix."""

    def __init__(self, url: str, model: str, timeout: float):
        self.url, self.model, self.timeout = url, model, timeout
        self.address = completions_address(url)
        key = os.environ.get(API_KEY_ENV)
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    def get(self, path: str) -> dict | None:
        """A JSON GET for what the server says about itself; None where it has no such endpoint."""
        try:
            req = urllib.request.Request(base_url(self.url) + path, headers=self.headers)
            with urllib.request.urlopen(req, timeout=min(self.timeout, 30)) as r:
                reply = json.loads(r.read().decode("utf-8"))
            return reply if isinstance(reply, dict) else None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError):
            return None

    def reachable(self) -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(base_url(self.url) + "/v1/models", headers=self.headers),
                                   timeout=min(self.timeout, 30)).close()
        except urllib.error.HTTPError:
            return  # it answers: an endpoint it lacks is not a server that is down
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise UserError(f"--endpoint {self.url}: cannot reach the server ({getattr(e, 'reason', e)}); start it "
                            "(README: Serving) or check the address") from None

    def complete(self, messages: list[dict], max_tokens: int) -> tuple[str, dict]:
        """(the answer text, the reply) for one conversation, greedy."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0, "top_p": 1,
                           "max_tokens": max_tokens, "stream": False}, ensure_ascii=False).encode("utf-8")
        for attempt in range(RETRIES + 1):
            try:
                req = urllib.request.Request(self.address, body, self.headers)
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    raw = r.read()
                break
            except urllib.error.HTTPError as e:
                detail = _error_text(e)
                if (e.code == 429 or e.code >= 500) and attempt < RETRIES:
                    time.sleep(2**attempt)
                    continue
                hint = ("check --served-model (GET /v1/models lists what it serves)" if e.code in (400, 404)
                        else "check the server's log")
                raise UserError(f"--endpoint {self.address}: HTTP {e.code} ({detail}); {hint}") from None
            except TimeoutError:
                raise UserError(f"--endpoint {self.address}: no answer within --timeout {self.timeout:g} s; raise "
                                "--timeout or lower --concurrency") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError):
                    raise UserError(f"--endpoint {self.address}: no answer within --timeout {self.timeout:g} s; "
                                    "raise --timeout or lower --concurrency") from None
                if attempt < RETRIES:
                    time.sleep(2**attempt)
                    continue
                raise UserError(f"--endpoint {self.address}: the server went away ({reason}); restart it and "
                                "rerun into the same --out to go on") from None
        try:
            reply = json.loads(raw.decode("utf-8"))
            content = reply["choices"][0]["message"]["content"]
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise TypeError
        except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
            raise UserError(f"--endpoint {self.address}: the reply is not an OpenAI-style chat completion "
                            f"({raw[:80]!r}); is this a chat-completions server?") from None
        return content.strip(), reply


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read().decode("utf-8", "replace"))
        msg = body.get("error", body)
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
        text = str(msg)
    except (ValueError, OSError, AttributeError):
        text = str(e.reason)
    text = " ".join(text.split())
    return text[:160] + ("..." if len(text) > 160 else "")


def endpoint_generate(url: str, served_model: str, *, max_new_tokens: int = 64, concurrency: int = 4,
                      timeout: float = 300, instruction: str | None = None, images_as: str | None = None
                      ) -> tuple[Callable[[list[EvalItem]], list[str]], dict]:
    """(generate(items) -> answers for `run_eval`, what the server says about itself for the protocol).

    `images_as`: the run whose training view of images to send (TrainedView); by default the served model's own
    name where that is an output directory on this machine (as `transformers serve DIR` names it), else none."""
    check_flags(url, served_model, concurrency, timeout)
    if images_as is None and (Path(served_model) / "qilin.json").is_file():
        images_as = served_model
    view = TrainedView.of(images_as) if images_as is not None else None
    if not is_local(url):
        log.warning("--endpoint %s is not this machine: every question and its images are sent there", url)
    client = Client(url, served_model, timeout)
    client.reachable()

    def generate(items: list[EvalItem]) -> list[str]:
        failed = threading.Event()  # after one failure, questions not yet sent are not sent

        def one(item: EvalItem) -> str | None:
            if failed.is_set():
                return None
            try:
                return client.complete(messages_for(item, instruction, view), max_new_tokens)[0]
            except BaseException:
                failed.set()
                raise

        with ThreadPoolExecutor(max_workers=min(concurrency, max(1, len(items)))) as pool:
            futures = [pool.submit(one, it) for it in items]
            answers: list[str] = []
            for f in futures:  # in order: a failure keeps the answers before it
                try:
                    answer = f.result()
                except UserError as e:
                    raise PartialAnswers(str(e), answers) from None
                except BaseException:  # Ctrl-C: the queued questions are not sent (leaving the pool would wait on all)
                    failed.set()
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
                if answer is None:  # skipped after a failure elsewhere: nothing after it is in order any more
                    failed_at = next((g for g in futures if g.done() and g.exception() is not None), None)
                    reason = str(failed_at.exception()) if failed_at is not None else "a request failed"
                    raise PartialAnswers(reason, answers)
                answers.append(answer)
        return answers

    described = describe_server(client)
    described["images"] = view.describe() if view is not None else "decoded, each on its own"
    return generate, described


def describe_server(client: Client) -> dict:
    """The protocol's model entry for a served model: its name, the address, what the server says it serves and
    which version it is."""
    models = client.get("/v1/models") or {}
    ids = [m.get("id") for m in models.get("data", []) if isinstance(m, dict)][:20]
    version = client.get("/version") or {}
    props = client.get("/props") or {}
    server = {"version": version.get("version"), "build_info": props.get("build_info"),
              "listed_models": ids}
    return {"name": client.model, "kind": "endpoint", "endpoint": client.url, "server": server}

