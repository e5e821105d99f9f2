"""One conversation with a model about one image: the core `chat` (terminal) and `web` (browser) share.

In:  a `Generator` (generate.py) and 1-4 image files (several become ONE composite, as ChiMed-VL did).
Out: answers, streamed while generated, kept in the conversation's history; the image goes in the first user turn
only (`<image>\\n` + question), as in LLaVA's dialogs, and the whole history is sent again each turn.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..errors import UserError
from ..families import COMPOSITE_MAX_IMAGES

DISCLAIMER = "仅供研究，不构成医疗诊断 / for research only, not a diagnosis"
COMMANDS = ("/image PATH... (new image, new conversation)   /add PATH... (more images for the next question; "
            "templates that keep images separate)   /reset (clear the conversation)   /quit (or Ctrl-D)")


@dataclass
class Reply:
    text: str
    tokens: int  # generated tokens, end-of-sequence excluded
    seconds: float
    stopped: bool = False  # cut short by Ctrl-C

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def parse_window(text: str | None) -> tuple[float, float] | None:
    """`"40,400"` -> (40.0, 400.0): DICOM / high-bit-depth window centre and width."""
    if text is None:
        return None
    try:
        center, width = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--window must be CENTER,WIDTH (e.g. 40,400 for soft tissue), not '{text}'") from None
    return center, width


def load_chat_images(paths, template, *, window: tuple[float, float] | None = None, frame: int | None = None,
                     max_bytes: int | None = None) -> list:
    """Image paths (or uploads in memory) -> what the model is shown, by the template's rule: `[composite]` (one image; ChiMed-VL's way) or
    each image on its own (`separate`: HuatuoGPT-Vision, up to 6). Raises UserError for any bad file."""
    from ..images.decode import load_images

    paths = _sources(paths)
    check_image_count(len(paths), template)
    if not template.separate_images:
        return [load_chat_image(paths, window=window, frame=frame, max_bytes=max_bytes)]
    kw = {"window": window, "frame": frame, **({"max_bytes": max_bytes} if max_bytes else {})}
    return [load_images([p], **kw) for p in paths]


def _sources(paths) -> list:
    """One path, several, or uploads held in memory (`images.decode.InMemory`, the web page's) -> a list."""
    from ..images.decode import InMemory

    one = isinstance(paths, (str, os.PathLike, InMemory))
    return [p if isinstance(p, InMemory) else Path(p) for p in ([paths] if one else paths)]


def check_image_count(n: int, template) -> None:
    """1 to the template's maximum (the same rule as training's: `Template.image_count_problem`)."""
    problem = "no image" if n < 1 else template.image_count_problem(n)
    if problem:
        raise UserError(f"{problem}; give 1 to {template.max_images} images")


def load_chat_image(paths, *, window: tuple[float, float] | None = None, frame: int | None = None,
                    max_bytes: int | None = None):
    """1-4 image paths -> one RGB image (a composite when several). Raises UserError for any bad file.
    `max_bytes`: refuse an image whose decoded size (from its header) is larger (the web server's bound)."""
    from ..images.decode import load_images

    paths = _sources(paths)
    if not 1 <= len(paths) <= COMPOSITE_MAX_IMAGES:
        raise UserError(f"chat takes 1 to {COMPOSITE_MAX_IMAGES} images (several are joined into one), "
                        f"got {len(paths)}")
    return load_images(paths, window=window, frame=frame, **({"max_bytes": max_bytes} if max_bytes else {}))


class ChatSession:
    """One conversation with a model about one image: `load_image(paths)`, `ask(text) -> str`, `reset()`.

    `ask` streams the answer to `stream` (a text file; None = silent) while it is generated. Ctrl-C during an
    answer (in the main thread) stops that answer after the current token; a second Ctrl-C aborts it at once.
    A stopped answer is not kept in the conversation.
    """

    def __init__(self, generator, *, name: str = "", kind: str = "", stream: TextIO | None = None,
                 window: tuple[float, float] | None = None, frame: int | None = None):
        self.generator = generator
        self.name = name or "model"
        self.kind = kind
        self.stream = stream
        self.window, self.frame = window, frame
        self.images: list = []  # PIL images shown to the model: one composite, or several (separate templates)
        self.asked = 0  # how many of them earlier questions carried; the rest go with the next question
        self.image_paths: list[Path] = []
        self.history: list[dict] = []
        self.last: Reply | None = None
        self._base_extra = dict(generator.extra)

    @classmethod
    def load(cls, model: str, *, adapter: str | None = None, bits: int | None = None, dtype: str | None = None,
             temperature: float = 0.2, max_new_tokens: int = 512, attn: str = "auto", stream: TextIO | None = None,
             window: tuple[float, float] | None = None, frame: int | None = None) -> "ChatSession":
        from .generate import load_generator

        generator, info = load_generator(model, adapter=adapter, bits=bits, dtype=dtype, temperature=temperature,
                                          max_new_tokens=max_new_tokens, attn=attn)
        return cls(generator, name=str(model) + (f" + adapter {adapter}" if adapter else ""), kind=info.kind,
                   stream=stream, window=window, frame=frame)

    @property
    def template(self):
        return self.generator.template

    @property
    def image(self):
        """The first image shown (the composite, for composite templates), or None."""
        return self.images[0] if self.images else None

    @image.setter
    def image(self, value) -> None:
        self.images, self.asked = ([] if value is None else [value]), 0

    def load_image(self, paths) -> None:
        """Show the model new image(s); starts a new conversation (the images belong to the first turn)."""
        self.show(load_chat_images(paths, self.template, window=self.window, frame=self.frame), paths)

    def show(self, images, paths) -> None:
        """Like `load_image`, for images already loaded from `paths` (one image or a list)."""
        self.images = list(images) if isinstance(images, (list, tuple)) else [images]
        self.image_paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        self.reset()

    def reset(self) -> None:
        self.history = []
        self.asked = 0

    def add_images(self, paths) -> None:
        """More images for the next question of this conversation (templates that keep images separate: their
        `<image>\n` go in front of that question, as HuatuoGPT-Vision's cli.py adds images in a later round)."""
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self.check_addable(len(paths))
        self.add_loaded(load_chat_images(paths, self.template, window=self.window, frame=self.frame), paths)

    def check_addable(self, n: int) -> None:
        """Can `n` more images join this conversation? (Asked before anything is decoded.)"""
        t = self.template
        if not t.separate_images:
            raise UserError(f"the {t.name} template joins images into one; load new images to start over")
        check_image_count(len(self.images) + n, t)

    def add_loaded(self, images: list, paths) -> None:
        """Like `add_images`, for images already loaded from `paths`."""
        self.check_addable(len(images))
        self.images += list(images)
        self.image_paths += [Path(p) for p in paths]

    def ask(self, text: str, stop: threading.Event | None = None) -> str:
        """Answer `text` in the current conversation; the answer is streamed and kept in the history.

        `stop` (set from another thread: the web page's Stop) ends the answer after the current token."""
        from transformers import StoppingCriteriaList

        from ..families import IMAGE_TOKEN, typed_text
        from ..data.records import LazyImage

        text = typed_text(text, self.template)
        if not text.strip():
            raise UserError("the question is empty (a typed <image> is left out: the image is attached already)")
        new = len(self.images) - self.asked  # images not yet in the conversation go in front of this question
        content = f"{IMAGE_TOKEN}\n" * new + text
        messages = self.history + [{"role": "user", "content": content}]
        # ImageLoader takes paths or dataset cells; a one-row "dataset" hands it the already loaded image(s).
        images = [LazyImage([{"image": img}], 0, "image") for img in self.images]
        tok = self.generator.tokenizer
        stop = stop if stop is not None else threading.Event()
        streamer = Streamer(tok, self.stream)
        self.generator.extra = {**self._base_extra, "stopping_criteria": StoppingCriteriaList([StopOnEvent(stop)])}
        start = time.perf_counter()
        with ctrl_c_sets(stop):
            answer = self.generator.generate([messages], [images], streamer=streamer)[0]
        seconds = time.perf_counter() - start
        self.last = Reply(answer, streamer.tokens, seconds, stopped=stop.is_set())
        if not stop.is_set():
            self.history = messages + [{"role": "assistant", "content": answer}]
            self.asked = len(self.images)
        return answer

    def regenerate(self, stop: threading.Event | None = None) -> str:
        """Answer the last question again (sampling may give another answer; greedy gives the same)."""
        from ..families import IMAGE_TOKEN

        if len(self.history) < 2:
            raise UserError("nothing to regenerate yet: ask a question first")
        question = self.history[-2]["content"]
        carried = 0  # the images that question carried go with it again
        while question.startswith(f"{IMAGE_TOKEN}\n"):
            question, carried = question[len(IMAGE_TOKEN) + 1:], carried + 1
        self.asked -= carried
        self.history = self.history[:-2]
        return self.ask(question, stop=stop)

    def banner(self) -> str:
        t = self.template
        lines = [
            f"qilin-lite chat | model: {self.name}" + (f" ({self.kind})" if self.kind else "")
            + f" | template: {t.name} | image mode: {self.generator.images.mode}",
            f"image: {self.describe_image()}",
            DISCLAIMER,
            f"commands: {COMMANDS}; Ctrl-C stops an answer",
        ]
        if not t.dialog:
            lines.insert(2, f"note: the '{t.name}' template (an align run) only captions the image; questions are ignored")
        return "\n".join(lines)

    def describe_image(self) -> str:
        if not self.images:
            return "none"
        if len(self.images) > 1:
            return ", ".join(p.name for p in self.image_paths) + f" ({len(self.images)} separate images)"
        names = " + ".join(p.name for p in self.image_paths)
        joined = f" (composite {self.image.width}x{self.image.height})" if len(self.image_paths) > 1 else ""
        return names + joined


class Streamer:
    """A `.generate()` streamer: writes the answer to `out` as words complete (None: silent), counts new tokens.

    transformers' TextStreamer decides when text is complete (whole words, each CJK character); this only
    redirects its output and counts.
    """

    def __init__(self, tokenizer, out: TextIO | None):
        from transformers import TextStreamer

        self.out, self.tokens, self.started, self.prompt_seen = out, 0, False, False
        self.eos = tokenizer.eos_token_id
        self.text = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.text.on_finalized_text = self._write

    def put(self, value) -> None:
        if self.prompt_seen:  # the first call carries the prompt
            self.tokens += sum(1 for t in value.reshape(-1).tolist() if t != self.eos)
        self.prompt_seen = True
        self.text.put(value)

    def end(self) -> None:
        self.text.end()

    def _write(self, text: str, stream_end: bool = False) -> None:
        if self.out is None:
            return
        if not self.started:  # the template puts no space after "ASSISTANT:"; the model writes one
            text = text.lstrip()
            self.started = bool(text)
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


class StopOnEvent:
    """Stopping criterion that ends generation once `event` is set (by Ctrl-C)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def ctrl_c_sets(event: threading.Event):
    """While generating: the first Ctrl-C sets `event` (stop after this token), a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        event.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def utf8_stdio() -> None:
    """Chinese must read and print even where the locale is ASCII/Latin-1; GBK/UTF-8 terminals are left alone."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        enc = getattr(stream, "encoding", None) or "ascii"
        try:
            "仅供研究".encode(enc)
        except (UnicodeEncodeError, LookupError):
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(encoding="utf-8", errors="replace")


@contextlib.contextmanager
def quiet(verbose: bool):
    """Loading messages (progress bars, dtype notes) only with --verbose: stdout and stderr stay for the answer."""
    if verbose:
        yield
        return
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)
        transformers.logging.enable_progress_bar()
