"""`qilin-lite chat`: talk to a trained model about a medical image in the terminal.

In:  1-4 image files (JPEG/PNG/TIFF/... or DICOM; several become ONE composite, as ChiMed-VL did), and any model
     directory qilin-lite accepts (base, align, lora, qlora, full, merged or converted run, or a hub id), optionally
     a peft adapter on top.
Out: answers streamed to stdout, turn after turn; with `--prompt`, one answer (stdout holds only the answer, or
     `{"answer", "model", "tokens", "seconds", "prompt_ids"}` with `--json`).

The conversation itself is `session.ChatSession` (shared with `web`); this module is the terminal around it.
The prompt is built by `Generator` with the template saved in the model directory, so chat prompts the model
exactly as training did.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional, TextIO

import typer

from ..errors import UserError
from ..options import Attn, Dtype, Frame, ImageFiles, Load4bit, Load8bit, ModelDir, Window, dtype_arg, quant_bits
from .chat_session import COMMANDS, DISCLAIMER, ChatSession, load_chat_images, parse_window, quiet, utf8_stdio


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
        except UserError as e:  # a question that cannot be asked ends that question, not the session
            out.write(f"\nerror: {e}\n")
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
    elif name == "/add":
        try:
            paths = shlex.split(rest)
            if not paths:
                raise UserError("usage: /add PATH [PATH ...]")
            session.add_images(paths)
        except (UserError, ValueError) as e:
            out.write(f"error: {e}\n")
            return False
        out.write(f"(images: {session.describe_image()}; the new ones go with your next question)\n")
    else:
        out.write(f"unknown command {name}; commands: {COMMANDS}\n")
    out.flush()
    return False


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
    dtype: str | None = None,
    attn: str = "auto",
) -> None:
    """What the command does; images are checked before torch and the model load, so a bad file fails at once."""
    utf8_stdio()
    if as_json and prompt is None:
        raise UserError("--json needs --prompt TEXT (it prints one answer as JSON)")
    from ..families import get_template
    from ..model import template_of

    image = load_chat_images(images, get_template(template_of(model)), window=window, frame=frame)
    with quiet(verbose):
        session = ChatSession.load(model, adapter=adapter, bits=bits, dtype=dtype, attn=attn, temperature=temperature,
                                   max_new_tokens=max_new_tokens, window=window, frame=frame)
    session.show(image, images)
    if prompt is None:
        with quiet(verbose):
            repl(session, verbose=verbose)
        return
    if not as_json:
        print(DISCLAIMER, file=sys.stderr)
    session.stream = None if as_json else sys.stdout
    with quiet(verbose):
        answer = session.ask(prompt)
    r = session.last
    if as_json:
        print(json.dumps({"answer": answer, "model": str(model), "tokens": r.tokens, "seconds": round(r.seconds, 3),
                          "prompt_ids": session.generator.last_prompt_ids}, ensure_ascii=False))
    if verbose:
        print(f"[{r.tokens} tokens in {r.seconds:.2f} s, {r.tokens_per_second:.1f} tokens/s]", file=sys.stderr)
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    @app.command("chat")
    def chat_command(
        images: ImageFiles,
        model: ModelDir,
        adapter: Annotated[Optional[str], typer.Option("--adapter", help="peft adapter directory applied on top of --model")] = None,
        load_4bit: Load4bit = False,
        load_8bit: Load8bit = False,
        temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy")] = 0.2,
        max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 512,
        prompt: Annotated[Optional[str], typer.Option("--prompt", help="answer this once and exit (stdout = the answer)")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="with --prompt: print {answer, model, tokens, seconds, prompt_ids} (prompt_ids: the ids the model was given, images expanded)")] = False,
        verbose: Annotated[bool, typer.Option("--verbose", help="loading messages and tokens/s")] = False,
        window: Window = None,
        frame: Frame = None,
        dtype: Dtype = "auto",
        attn: Attn = "auto",
    ):
        """Chat about an image with a trained model (interactive; --prompt answers once). Not a diagnosis."""
        chat(images, model, adapter=adapter, bits=quant_bits(load_4bit, load_8bit),
             temperature=temperature, max_new_tokens=max_new_tokens, prompt=prompt, as_json=as_json,
             verbose=verbose, window=parse_window(window), frame=frame, dtype=dtype_arg(dtype), attn=attn)
