"""chat: a real terminal session (pty) with two Chinese turns, a new image and /quit; --prompt and --json print only
the answer; DICOM and 2-image composites reach the model; bad images end with one line and exit 2, before the model
loads; Ctrl-C stops an answer, not the session. Expected answers come from `ChatSession` in-process (greedy)."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from qilin_lite.data.records import LazyImage
from qilin_lite.errors import UserError
from qilin_lite.images.decode import composite, load_image
from qilin_lite.serve.chat_session import DISCLAIMER, ChatSession

CLI = str(Path(sys.executable).with_name("qilin-lite"))
Q1, Q2, Q3 = "病灶位于哪一侧？", "这是什么类型的影像？", "图中有几个病灶？"
GREEDY = ["--temperature", "0", "--max-new-tokens", "8"]


def env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def demo_images(tiny_data) -> list[Path]:
    return sorted(Path(tiny_data["images"]).glob("img_*.png"))[:3]


def write_dicom(path: Path, rows: int = 48, cols: int = 40) -> Path:
    """A small CT-like DICOM (uint16, rescale to HU, soft-tissue window), the kind a PACS exports."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "CT", "DOE^JANE"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, -1024, 40, 400
    yy, xx = np.mgrid[:rows, :cols]
    hu = np.where((yy - rows / 2) ** 2 + (xx - cols / 3) ** 2 < 60, 60, -50) + 1024  # a bright lesion on the left
    ds.PixelData = hu.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def expected(run, *conversations: tuple[list, list[str]]) -> list[str]:
    """Greedy answers in-process: for each (images, questions), a new conversation about those images."""
    session = ChatSession.load(str(run), temperature=0, max_new_tokens=8)
    answers = []
    for images, questions in conversations:
        session.load_image(images)
        answers += [session.ask(q) for q in questions]
    return answers


# ---------------------------------------------------------------- the terminal session


class Terminal:
    """A child process on a pseudo-terminal, read until expected text shows up."""

    def __init__(self, argv: list[str], environ: dict):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: become the command, never return into pytest
            try:
                os.execvpe(argv[0], argv, environ)
            finally:
                os._exit(127)
        self.buf = b""

    def expect(self, text: str, start: int = 0, timeout: float = 120) -> int:
        """Wait until `text` appears at or after byte `start`; return the index just past it."""
        token = text.encode("utf-8")
        deadline = time.monotonic() + timeout
        while (i := self.buf.find(token, start)) < 0:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"timed out waiting for {text!r}; output so far:\n{self.text}")
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"terminal closed before {text!r}; output:\n{self.text}")
            self.buf += data
        return i + len(token)

    def send(self, line: str) -> int:
        mark = len(self.buf)
        os.write(self.fd, (line + "\n").encode("utf-8"))
        return mark

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with_data, _, _ = select.select([self.fd], [], [], 0.2)
            if with_data:
                try:
                    self.buf += os.read(self.fd, 65536)
                except OSError:
                    pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"chat did not exit; output:\n{self.text}")

    @property
    def text(self) -> str:
        return self.buf.decode("utf-8", errors="replace")


def test_interactive_session_in_a_terminal(lora_run, tiny_data, tmp_path):
    first, second, third = demo_images(tiny_data)
    a1, a2, a3 = expected(lora_run, ([first], [Q1, Q2]), ([second, third], [Q3]))
    # A Latin-1 stdio encoding must not break Chinese: chat switches such streams to UTF-8.
    term = Terminal([CLI, "chat", str(first), "--model", str(lora_run), *GREEDY, "--verbose"],
                    env(PYTHONIOENCODING="latin-1"))
    pos = term.expect("USER: ")
    banner = term.text
    assert DISCLAIMER in banner and "template: vicuna_v1" in banner and str(lora_run) in banner
    assert "/image" in banner and "/reset" in banner and "/quit" in banner

    for question, answer in ((Q1, a1), (Q2, a2)):  # the second answer depends on the first turn being kept
        pos = term.expect("ASSISTANT: ", term.send(question))
        pos = term.expect(answer, pos)
        pos = term.expect("tokens/s", pos)  # --verbose
        pos = term.expect("USER: ", pos)

    pos = term.expect("error: ", term.send(f"/image {tmp_path / 'missing.png'}"))  # a bad file ends the command only
    pos = term.expect("USER: ", pos)
    pos = term.expect("new image: ", term.send(f"/image {second} {third}"))
    assert "composite" in term.text[-300:]
    pos = term.expect("ASSISTANT: ", term.send(Q3))
    pos = term.expect(a3, pos)
    term.expect("USER: ", pos)
    term.send("/quit")
    assert term.wait() == 0
    assert "Traceback" not in term.text
    assert Q1 in term.text  # the terminal echoed the Chinese input back intact


# ---------------------------------------------------------------- one-shot answers




def test_prompt_prints_only_the_answer_for_a_dicom(lora_run, tmp_path, capfd, monkeypatch):
    dcm = write_dicom(tmp_path / "ct.dcm")
    (answer,) = expected(lora_run, ([dcm], [Q1]))
    capfd.readouterr()
    assert run_cli(["chat", str(dcm), "--model", str(lora_run), "--prompt", Q1, *GREEDY], monkeypatch) == 0
    out, err = capfd.readouterr()
    assert out.strip() == answer and out.count("\n") == answer.count("\n") + 1
    assert DISCLAIMER in err


def test_json_answer_for_a_composite(qlora_run, tiny_data):
    first, second, _ = demo_images(tiny_data)
    (answer,) = expected(qlora_run, ([first, second], [Q1]))
    out = subprocess.run([CLI, "chat", str(first), str(second), "--model", str(qlora_run), "--prompt", Q1, "--json",
                          *GREEDY], capture_output=True, text=True, encoding="utf-8", env=env(), timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1  # one JSON line and nothing else
    reply = json.loads(out.stdout)
    assert set(reply) == {"answer", "model", "tokens", "seconds", "prompt_ids"}
    assert reply["answer"] == answer and reply["model"] == str(qlora_run)
    # the ids the model was given: the composite is one image, expanded; the prompt ends where the answer starts
    from qilin_lite.serve.generate import load_generator

    gen, _ = load_generator(str(qlora_run), temperature=0)
    msgs = [{"role": "user", "content": f"<image>\n{Q1}"}]
    assert reply["prompt_ids"] == gen.prompt_ids(msgs).tolist()
    assert reply["prompt_ids"].count(gen.layout.image_token_id) == gen.layout.num_image_tokens
    assert 0 < reply["tokens"] <= 8 and reply["seconds"] > 0
    assert "\\u" not in out.stdout  # ensure_ascii=False: Chinese stays readable


def test_composite_is_one_image_and_dicom_is_used(lora_run, tiny_data, tmp_path):
    first, second, _ = demo_images(tiny_data)
    session = ChatSession.load(str(lora_run), temperature=0, max_new_tokens=4)
    session.load_image([first, second])
    assert session.image.size == composite([load_image(first), load_image(second)]).size
    seen = []
    loader = session.generator.images
    original, inputs = loader.__call__, loader.inputs
    loader.inputs = lambda pil: seen.append(inputs(pil)["pixel_values"]) or {"pixel_values": seen[-1]}
    session.ask(Q1)
    session.ask(Q2)
    assert [p.shape[0] for p in seen] == [1, 1]  # one composite per request, not one image per file
    prompt = session.history[0]["content"]
    assert prompt.startswith("<image>\n") and all("<image>" not in m["content"] for m in session.history[1:])

    dcm = write_dicom(tmp_path / "ct.dcm")
    session.load_image(dcm)
    assert session.history == [] and session.image.mode == "RGB" and session.image.size == (40, 48)
    session.ask(Q1)
    want = original([LazyImage([{"image": load_image(dcm)}], 0, "image")])
    assert torch.equal(seen[-1], want) and seen[-1].std() > 0  # the windowed DICOM pixels reached the model


def test_ctrl_c_stops_the_answer_not_the_session(lora_run, tiny_data):
    # whatever this process inherited (Python's default, or SIG_IGN under nohup / a background job) must come back
    before = signal.getsignal(signal.SIGINT)
    session = ChatSession.load(str(lora_run), temperature=0, max_new_tokens=60)
    session.load_image(demo_images(tiny_data)[0])

    class InterruptOnFirstWords:
        def __init__(self):
            self.sent = False

        def write(self, text):
            if text and not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C in the terminal does

        def flush(self):
            pass

    session.stream = InterruptOnFirstWords()
    session.ask(Q1)
    assert session.last.stopped and session.last.tokens < 60
    assert session.history == []  # the stopped answer is not kept
    session.stream = None
    session.ask(Q1)  # the session goes on, and the handler from before is back
    assert not session.last.stopped and len(session.history) == 2
    assert signal.getsignal(signal.SIGINT) is before


def test_adapter_on_top_of_a_base(lora_run, tiny_base, tiny_data):
    image = demo_images(tiny_data)[0]
    via_run = ChatSession.load(str(lora_run), temperature=0, max_new_tokens=8)
    via_adapter = ChatSession.load(str(tiny_base), adapter=str(lora_run), temperature=0, max_new_tokens=8)
    for s in (via_run, via_adapter):
        s.load_image(image)
    assert via_adapter.ask(Q1) == via_run.ask(Q1)
    with pytest.raises(UserError, match="already carries an adapter"):
        ChatSession.load(str(lora_run), adapter=str(lora_run))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_on_load_on_cpu(bits, qlora_run, tiny_data):
    import bitsandbytes as bnb

    session = ChatSession.load(str(qlora_run), bits=bits, temperature=0, max_new_tokens=4)
    quantized = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert any(isinstance(m, quantized) for m in session.generator.model.modules())
    session.load_image(demo_images(tiny_data)[0])
    session.ask(Q1)
    assert session.last.tokens > 0


# ---------------------------------------------------------------- bad input


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming a huge image, with almost no data: a decompression bomb's signature."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def bad_file(kind: str, folder: Path) -> Path:
    if kind == "missing":
        return folder / "nope.png"
    if kind == "unsupported":
        (folder / "report.txt").write_text("not an image\n")
        return folder / "report.txt"
    if kind == "corrupt":
        noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(folder / "full.png")
        data = (folder / "full.png").read_bytes()
        (folder / "cut.png").write_bytes(data[: len(data) // 2])
        return folder / "cut.png"
    if kind == "truncated-dicom":
        path = write_dicom(folder / "cut.dcm", rows=64, cols=64)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * 0.6)])
        return path
    if kind == "bomb":
        return png_claiming(folder / "bomb.png", 20000, 20000)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing", "unsupported", "corrupt", "truncated-dicom", "bomb"])
def test_bad_image_is_one_line_and_exit_2(kind, tmp_path):
    # The model directory does not exist: the image must be refused before the model is even looked at.
    path = bad_file(kind, tmp_path)
    out = subprocess.run([CLI, "chat", str(path), "--model", str(tmp_path / "no-model"), "--prompt", Q1],
                         capture_output=True, text=True, encoding="utf-8", env=env(), timeout=60)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and path.name in lines[0], out.stderr
    assert "Traceback" not in out.stderr and "DOE" not in out.stderr


def test_image_command_writes_what_training_saw_for_servers(lora_run, tmp_path, monkeypatch, capsys):
    """A server gives the PNG to the HF processor alone (resize + centre crop); that must equal what training fed
    the model from the original non-square DICOM (windowed, padded to a square). No header value goes along."""
    from conftest import run_cli_captured

    from qilin_lite.model import load_tokenizer_and_processor
    from qilin_lite.images.pixel_values import ImageLoader

    dcm = write_dicom(tmp_path / "ct.dcm", rows=48, cols=40)
    out = tmp_path / "给服务器" / "ct.png"
    code, stdout, _ = run_cli_captured(monkeypatch, capsys, "image", dcm, "--model", lora_run, "--out", out)
    assert code == 0 and stdout.strip() == str(out)
    png = Image.open(out)
    assert png.size == (48, 48) and png.mode == "RGB"
    _, ip = load_tokenizer_and_processor(str(lora_run))
    served = ip(images=[png], return_tensors="pt")["pixel_values"]
    trained = ImageLoader(ip, "pad")([dcm])
    assert torch.equal(served, trained)
    assert b"DOE" not in out.read_bytes() and not png.info.get("text")

    code, _, err = run_cli_captured(monkeypatch, capsys, "image", dcm, "--out", tmp_path / "ct.jpg")
    assert code == 2 and err.strip().startswith("error:") and ".png" in err and "\n" not in err.strip()


def test_a_typed_image_tag_is_text_in_every_mode(lora_run, tiny_data, monkeypatch, capfd):
    """People who know LLaVA prompts type `<image>`: it is left out (the image is attached already), as
    HuatuoGPT-Vision's cli.py does, never a second placeholder, a traceback or a lost session."""
    first = demo_images(tiny_data)[0]
    (answer,) = expected(lora_run, ([first], [Q1]))
    capfd.readouterr()
    assert run_cli(["chat", str(first), "--model", str(lora_run), "--prompt", f"<image>\n{Q1}", *GREEDY],
                   monkeypatch) == 0
    assert capfd.readouterr().out.strip() == answer
    assert run_cli(["chat", str(first), "--model", str(lora_run), "--prompt", "<image>", *GREEDY], monkeypatch) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the question is empty") and "Traceback" not in "\n".join(err)
    # interactive: the bad line is one error, and the session answers the next question
    session = ChatSession.load(str(lora_run), temperature=0, max_new_tokens=8)
    session.load_image([first])
    lines = iter(["<image>", f"{Q1}<image>", "/quit"])
    from io import StringIO

    from qilin_lite.serve.chat import repl

    out = StringIO()
    repl(session, read=lambda prompt: next(lines), out=out)
    assert "error: the question is empty" in out.getvalue()
    assert session.history[-1]["content"] == answer and session.history[0]["content"] == f"<image>\n{Q1}"


def test_a_conversation_longer_than_the_context_is_one_line(lora_run, tiny_data, monkeypatch, capsys):
    """A question past the model's positions is refused with its length; one that fits gets what room is left."""
    from qilin_lite.errors import UserError
    from qilin_lite.serve.generate import load_generator

    gen, _ = load_generator(str(lora_run), temperature=0, max_new_tokens=4)
    image = sorted(Path(tiny_data["images"]).iterdir())[0]
    context = gen.context_length()
    assert context and context >= 64
    with pytest.raises(UserError, match=rf"^the conversation is \d+ tokens .* context of {context}; clear"):
        gen.answer([image], "<image>\n" + "肺 " * context)
    gen.max_new_tokens = 10 * context  # more than fits: capped at the context, not an error deep in the model
    prompt = len(gen.prompt_ids([{"role": "user", "content": "<image>\n病灶位于哪一侧？"}]))
    seen = {}
    real = gen.model.generate
    monkeypatch.setattr(gen.model, "generate", lambda **kw: seen.update(kw) or real(**{**kw, "max_new_tokens": 2}))
    gen.answer([image], "<image>\n病灶位于哪一侧？")
    assert seen["max_new_tokens"] == context - prompt
