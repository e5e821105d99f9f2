"""`qilin-lite chat`: talk to a trained model about a medical image in the terminal.

In:  1-4 image files (JPEG/PNG/TIFF/... or DICOM; several become ONE composite, as ChiMed-VL did), and any model
     directory qilin-lite accepts (base, align, lora, qlora, full, merged or converted run, or a hub id), optionally
     a peft adapter on top.
Out: answers streamed to stdout, turn after turn; with `--prompt`, one answer (stdout holds only the answer, or
     `{"answer", "model", "tokens", "seconds", "prompt_ids"}` with `--json`).

`ChatSession` is the plain-Python core (load_image / ask / reset); the typer command is a thin layer over it.
The prompt is built by `Generator` with the template saved in the model directory, so chat prompts the model
exactly as training did. The image goes in the first user turn only (`<image>\\n` + question), as in LLaVA's
dialogs; later turns are text, and the whole history is sent again each turn.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Optional, TextIO

import typer

from .errors import UserError

DISCLAIMER = "仅供研究，不构成医疗诊断 / for research only, not a diagnosis"
COMMANDS = "/image PATH... (new image, new conversation)   /reset (clear the conversation)   /quit (or Ctrl-D)"
MAX_IMAGES = 4  # ChiMed-VL drops records with more; a composite of more would be unreadably small


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


def load_chat_image(paths, *, window: tuple[float, float] | None = None, frame: int | None = None):
    """1-4 image paths -> one RGB image (a composite when several). Raises UserError for any bad file."""
    from .images import load_images

    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not 1 <= len(paths) <= MAX_IMAGES:
        raise UserError(f"chat takes 1 to {MAX_IMAGES} images (several are joined into one), got {len(paths)}")
    return load_images(paths, window=window, frame=frame)


def default_dtype() -> str:
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"  # CPU half precision is slow and gains nothing at inference


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
        self.image = None  # PIL image shown to the model (composite when several files)
        self.image_paths: list[Path] = []
        self.history: list[dict] = []
        self.last: Reply | None = None
        self._base_extra = dict(generator.extra)

    @classmethod
    def load(cls, model: str, *, adapter: str | None = None, bits: int | None = None, dtype: str | None = None,
             temperature: float = 0.2, max_new_tokens: int = 512, attn: str = "auto", stream: TextIO | None = None,
             window: tuple[float, float] | None = None, frame: int | None = None) -> "ChatSession":
        generator, info = build_generator(model, adapter=adapter, bits=bits, dtype=dtype, temperature=temperature,
                                          max_new_tokens=max_new_tokens, attn=attn)
        return cls(generator, name=str(model) + (f" + adapter {adapter}" if adapter else ""), kind=info.kind,
                   stream=stream, window=window, frame=frame)

    @property
    def template(self):
        return self.generator.template

    def load_image(self, paths) -> None:
        """Show the model new image(s); starts a new conversation (the image belongs to the first turn)."""
        self.show(load_chat_image(paths, window=self.window, frame=self.frame), paths)

    def show(self, image, paths) -> None:
        """Like `load_image`, for an image already loaded from `paths`."""
        self.image = image
        self.image_paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        self.reset()

    def reset(self) -> None:
        self.history = []

    def ask(self, text: str, stop: threading.Event | None = None) -> str:
        """Answer `text` in the current conversation; the answer is streamed and kept in the history.

        `stop` (set from another thread: the web page's Stop) ends the answer after the current token."""
        from transformers import StoppingCriteriaList

        from .conversation import IMAGE_TOKEN
        from .records import LazyImage

        content = text
        if not self.history and self.image is not None:
            content = f"{IMAGE_TOKEN}\n{text}"
        messages = self.history + [{"role": "user", "content": content}]
        # ImageLoader takes paths or dataset cells; a one-row "dataset" hands it the already loaded composite.
        images = [LazyImage([{"image": self.image}], 0, "image")] if self.image is not None else []
        tok = self.generator.tokenizer
        stop = stop if stop is not None else threading.Event()
        streamer = _Streamer(tok, self.stream)
        self.generator.extra = {**self._base_extra, "stopping_criteria": StoppingCriteriaList([_StopOnEvent(stop)])}
        start = time.perf_counter()
        with _ctrl_c_sets(stop):
            answer = self.generator.generate([messages], [images], streamer=streamer)[0]
        seconds = time.perf_counter() - start
        self.last = Reply(answer, streamer.tokens, seconds, stopped=stop.is_set())
        if not stop.is_set():
            self.history = messages + [{"role": "assistant", "content": answer}]
        return answer

    def regenerate(self, stop: threading.Event | None = None) -> str:
        """Answer the last question again (sampling may give another answer; greedy gives the same)."""
        from .conversation import IMAGE_TOKEN

        if len(self.history) < 2:
            raise UserError("nothing to regenerate yet: ask a question first")
        question = self.history[-2]["content"]
        if len(self.history) == 2 and self.image is not None:
            question = question.removeprefix(f"{IMAGE_TOKEN}\n")
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
        if t.plain:
            lines.insert(2, "note: the 'plain' template (an align run) only captions the image; questions are ignored")
        return "\n".join(lines)

    def describe_image(self) -> str:
        if self.image is None:
            return "none"
        names = " + ".join(p.name for p in self.image_paths)
        joined = f" (composite {self.image.width}x{self.image.height})" if len(self.image_paths) > 1 else ""
        return names + joined


def build_generator(model: str, *, adapter: str | None = None, bits: int | None = None, dtype: str | None = None,
                    temperature: float = 0.2, max_new_tokens: int = 512, attn: str = "auto"):
    """Model directory (+ adapter) -> (a ready `Generator` using the template saved with the weights, its RunInfo)."""
    import torch

    from .conversation import get_template
    from .generate import Generator
    from .model import load_run, token_layout
    from .processing import ImageLoader

    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), not {temperature}")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, not {max_new_tokens}")
    p = Path(model)
    if not p.exists() and (str(model).startswith((".", "/", "~")) or str(model).count("/") > 1):
        raise UserError(f"{model}: model directory not found; pass a run directory or a hub id")
    model_obj, tok, ip, info = load_run(model, bits=bits, dtype=dtype or default_dtype(), attn=attn)
    if adapter:
        model_obj, info = _apply_adapter(model_obj, info, Path(adapter))
    if bits is None and torch.cuda.is_available():
        model_obj.to("cuda")  # quantized models are placed on the GPU by from_pretrained already
    model_obj.eval()
    layout = token_layout(model_obj.config, max_length=10**9)
    generator = Generator(model_obj, tok, ImageLoader(ip, info.image_mode), get_template(info.template), layout,
                          max_new_tokens=max_new_tokens, temperature=temperature)
    return generator, info


def _apply_adapter(model, info, adapter: Path):
    from peft import PeftModel

    from .model import RunInfo

    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: no adapter_config.json; --adapter takes a peft adapter directory "
                        "(a lora/qlora run)")
    if isinstance(model, PeftModel):
        raise UserError(
            f"--model is a {info.kind} run that already carries an adapter; pass {adapter} as --model on its own, "
            "or merge the first one (`qilin-lite merge`) and use the merged directory as --model"
        )
    model = PeftModel.from_pretrained(model, str(adapter))
    own = RunInfo.load(adapter)  # a qilin-lite run carries the template it was trained with
    return model, (own if own is not None else info)


class _Streamer:
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


class _StopOnEvent:
    """Stopping criterion that ends generation once `event` is set (by Ctrl-C)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def _ctrl_c_sets(event: threading.Event):
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


# ---------------------------------------------------------------- the terminal loop


def repl(session: ChatSession, *, read: Callable[[str], str] = input, out: TextIO | None = None,
         verbose: bool = False) -> None:
    """Interactive loop until /quit or end of input. Bad `/image` files print one line and the session goes on."""
    out = out or sys.stdout
    session.stream = out
    if read is input:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    user, assistant = session.template.user, session.template.assistant
    out.write(session.banner() + "\n")
    out.flush()
    while True:
        try:
            line = read(f"{user}: ").strip()
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:  # at the prompt: drop the line, keep the session
            out.write("\n(Ctrl-C: line dropped; /quit or Ctrl-D to leave)\n")
            continue
        if not line:
            continue
        if line.startswith("/"):
            if _command(session, line, out):
                return
            continue
        out.write(f"{assistant}: ")
        out.flush()
        try:
            session.ask(line)
        except KeyboardInterrupt:
            out.write("\n[answer stopped; not kept in the conversation]\n")
            continue
        if session.last.stopped:
            out.write("[answer stopped; not kept in the conversation]\n")
        if verbose:
            r = session.last
            sys.stderr.write(f"[{r.tokens} tokens in {r.seconds:.2f} s, {r.tokens_per_second:.1f} tokens/s]\n")
        out.flush()


def _command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Run an in-session command; True means quit."""
    name, _, rest = line.partition(" ")
    if name in ("/quit", "/exit", "/q"):
        return True
    if name == "/reset":
        session.reset()
        out.write("(conversation cleared; same image)\n")
    elif name == "/image":
        try:
            paths = shlex.split(rest)
        except ValueError:
            paths = rest.split()
        if not paths:
            out.write("usage: /image PATH [PATH ...]  (2-4 paths are joined into one image)\n")
            return False
        try:
            session.load_image(paths)
        except UserError as e:  # a bad file ends the command, not the session
            out.write(f"error: {e}\n")
            return False
        out.write(f"(new image: {session.describe_image()}; new conversation)\n")
    else:
        out.write(f"unknown command {name}; commands: {COMMANDS}\n")
    out.flush()
    return False


def _utf8_stdio() -> None:
    """Chinese must read and print even where the locale is ASCII/Latin-1; GBK/UTF-8 terminals are left alone."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        enc = getattr(stream, "encoding", None) or "ascii"
        try:
            "仅供研究".encode(enc)
        except (UnicodeEncodeError, LookupError):
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(encoding="utf-8", errors="replace")


@contextlib.contextmanager
def _quiet(verbose: bool):
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


def chat(
    images: list[Path],
    model: str,
    *,
    adapter: str | None = None,
    bits: int | None = None,
    temperature: float = 0.2,
    max_new_tokens: int = 512,
    prompt: str | None = None,
    as_json: bool = False,
    verbose: bool = False,
    window: tuple[float, float] | None = None,
    frame: int | None = None,
) -> None:
    """What the command does; images are checked before torch and the model load, so a bad file fails at once."""
    _utf8_stdio()
    if as_json and prompt is None:
        raise UserError("--json needs --prompt TEXT (it prints one answer as JSON)")
    image = load_chat_image(images, window=window, frame=frame)
    with _quiet(verbose):
        session = ChatSession.load(model, adapter=adapter, bits=bits, temperature=temperature,
                                   max_new_tokens=max_new_tokens, window=window, frame=frame)
    session.show(image, images)
    if prompt is None:
        with _quiet(verbose):
            repl(session, verbose=verbose)
        return
    if not as_json:
        print(DISCLAIMER, file=sys.stderr)
    session.stream = None if as_json else sys.stdout
    with _quiet(verbose):
        answer = session.ask(prompt)
    r = session.last
    if as_json:
        print(json.dumps({"answer": answer, "model": str(model), "tokens": r.tokens, "seconds": round(r.seconds, 3),
                          "prompt_ids": session.generator.last_prompt_ids}, ensure_ascii=False))
    if verbose:
        print(f"[{r.tokens} tokens in {r.seconds:.2f} s, {r.tokens_per_second:.1f} tokens/s]", file=sys.stderr)
    sys.stdout.flush()


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the fill when no model is named (CLIP's processors)


def prepare_image(paths, out: str | Path, *, model: str | None = None, window: tuple[float, float] | None = None,
                  frame: int | None = None) -> Path:
    """1-4 images -> one PNG holding what the model saw in training: the composite, DICOM / 16-bit windowing and,
    for runs trained with `pad`, the square padding in the processor's mean colour.

    For servers: they hand images to the HF processor, which only resizes and centre-crops, and they read no DICOM.
    Pixels only: the PNG carries no metadata, so no DICOM header value leaves the input file this way."""
    from .images import expand_to_square
    from .model import RunInfo, load_tokenizer_and_processor
    from .processing import ImageLoader, pad_fill

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: the output must be a .png (lossless); JPEG would change the pixels again")
    image = load_chat_image(paths, window=window, frame=frame)
    mode, fill = "pad", pad_fill(CLIP_MEAN)
    if model is not None:
        info = RunInfo.load(Path(model)) if Path(model).is_dir() else None
        loader = ImageLoader(load_tokenizer_and_processor(str(model))[1], info.image_mode if info else "pad")
        mode, fill = loader.mode, loader.fill
    if mode == "pad":
        image = expand_to_square(image, fill)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    return out


def register(app: typer.Typer) -> None:
    @app.command("image")
    def image_command(
        images: Annotated[list[Path], typer.Argument(metavar="IMAGE...", help="image file(s): JPEG/PNG/TIFF/DICOM...; 2-4 are joined into one")],
        out: Annotated[Path, typer.Option("--out", help="the PNG to write")],
        model: Annotated[Optional[str], typer.Option("--model", help="the run whose image mode and fill colour to use (default: pad, CLIP mean)")] = None,
        window: Annotated[Optional[str], typer.Option("--window", help="CENTER,WIDTH for DICOM / 16-bit images, e.g. 40,400")] = None,
        frame: Annotated[Optional[int], typer.Option("--frame", help="frame of a multi-frame file (DICOM default: middle)")] = None,
    ):
        """Write the image as the model saw it in training (square, windowed, composite) for servers to read."""
        typer.echo(prepare_image(images, out, model=model, window=parse_window(window), frame=frame))

    @app.command("chat")
    def chat_command(
        images: Annotated[list[Path], typer.Argument(metavar="IMAGE...", help="image file(s): JPEG/PNG/TIFF/DICOM...; 2-4 are joined into one")],
        model: Annotated[str, typer.Option("--model", help="run directory (align/lora/qlora/full/merged) or hub id")],
        adapter: Annotated[Optional[str], typer.Option("--adapter", help="peft adapter directory applied on top of --model")] = None,
        load_4bit: Annotated[bool, typer.Option("--load-4bit", help="quantize the LLM to 4-bit NF4 on load")] = False,
        load_8bit: Annotated[bool, typer.Option("--load-8bit", help="quantize the LLM to 8-bit on load")] = False,
        temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy")] = 0.2,
        max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 512,
        prompt: Annotated[Optional[str], typer.Option("--prompt", help="answer this once and exit (stdout = the answer)")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="with --prompt: print {answer, model, tokens, seconds, prompt_ids} (prompt_ids: the ids the model was given, images expanded)")] = False,
        verbose: Annotated[bool, typer.Option("--verbose", help="loading messages and tokens/s")] = False,
        window: Annotated[Optional[str], typer.Option("--window", help="CENTER,WIDTH for DICOM / 16-bit images, e.g. 40,400")] = None,
        frame: Annotated[Optional[int], typer.Option("--frame", help="frame of a multi-frame file (DICOM default: middle)")] = None,
    ):
        """Chat about an image with a trained model (interactive; --prompt answers once). Not a diagnosis."""
        if load_4bit and load_8bit:
            raise UserError("choose one of --load-4bit and --load-8bit")
        chat(images, model, adapter=adapter, bits=4 if load_4bit else 8 if load_8bit else None,
             temperature=temperature, max_new_tokens=max_new_tokens, prompt=prompt, as_json=as_json,
             verbose=verbose, window=parse_window(window), frame=frame)
