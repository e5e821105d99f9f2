"""A full disk is one line saying so and how to go on, and nothing half-written is taken as complete."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli_captured

from qilin_lite.errors import disk_full

CLI = str(Path(sys.executable).with_name("qilin-lite"))
SMALL = ["--set", "model.dtype=float32", "--set", "model.attn=sdpa", "--set", "train.bf16=false",
         "--set", "train.tf32=false", "--set", "train.gradient_checkpointing=false", "--set", "data.num_workers=0",
         "--set", "train.global_batch=4", "--set", "train.per_device_batch=2", "--set", "train.max_steps=4",
         "--set", "train.save_steps=1", "--set", "train.lr=1e-2", "--set", "data.max_length=256"]


def test_what_counts_as_a_full_disk():
    assert disk_full(OSError(errno.ENOSPC, "No space left on device", "/out/x.gguf")) == \
        "No space left on device: /out/x.gguf"
    # torch's checkpoint writer never says ENOSPC: it reports a short write
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 55872 vs 55760")
    assert disk_full(wrapped) == "a checkpoint file could not be written to the end"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise ValueError("while saving") from inner
    except ValueError as outer:
        assert disk_full(outer) == "No space left on device"
    from safetensors import SafetensorError

    assert disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")) \
        == "No space left on device"
    assert disk_full(OSError("32768 requested and 21120 written")) == "a file could not be written to the end"
    assert disk_full(OSError(errno.EACCES, "Permission denied")) is None and disk_full(ValueError("x")) is None


def test_a_full_disk_in_any_command_is_one_line(monkeypatch, capsys, tmp_path):
    import qilin_lite.data.check as check

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out.jsonl"))

    monkeypatch.setattr(check, "check_data", full)
    (tmp_path / "d.jsonl").write_text("{}\n")
    code, _, err = run_cli_captured(monkeypatch, capsys, "data", "check", tmp_path / "d.jsonl")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"error: the disk is full (No space left on device: {tmp_path / 'out.jsonl'})"
                                            "; free space, then run the same command again")


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 3 MB tmpfs here ({r.stderr.strip()[:80]}); the one-line message is tested above")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_training_onto_a_full_disk_says_so_and_resume_recovers(small_disk, align_run, tiny_data):
    out = small_disk / "run"
    args = [CLI, "tune", "--full", "--from", str(align_run), "--data", str(tiny_data["tune"]), "--image-folder",
            str(tiny_data["images"]), "--out", str(out), *SMALL]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: the disk is full (") and line.endswith("last checkpoint saved completely")
    assert not (out / "qilin.json").exists()  # no half-saved model looks finished
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    r = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "qilin.json").exists() and '"steps": 4' in (out / "train_summary.json").read_text()


def leave_free(disk: Path, free: int) -> Path:
    """Fill `disk` with a ballast file until `free` bytes are left; returns the ballast (delete it to free space)."""
    ballast = disk / "ballast"
    st = os.statvfs(disk)
    size = st.f_bavail * st.f_frsize - free
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(size, 0))
    return ballast


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: the disk is full (") and "run the same command again" in line, line
    return line


def run(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def test_data_build_onto_a_full_disk_leaves_no_complete_looking_file(small_disk, tmp_path):
    from test_databuild import write_jsonl

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(images / "a.png")
    rows = ({"id": f"r{i}", "image": "a.png", "caption": "胸部CT平扫示右肺上叶结节。" * 20} for i in range(2000))
    src = write_jsonl(tmp_path / "src.jsonl", rows)  # ~1 MB of output
    ballast = leave_free(small_disk, 64 * 2**10)
    out = small_disk / "train.jsonl"
    one_error_line(run("data", "build", src, "--out", out, "--image-folder", images, "--task", "align",
                       "--workers", "0"))
    assert sorted(p.name for p in small_disk.iterdir()) == ["ballast"]  # no output, no .tmp, no report
    ballast.unlink()
    r = run("data", "build", src, "--out", out, "--image-folder", images, "--task", "align", "--workers", "0")
    assert r.returncode == 0 and len(out.read_text(encoding="utf-8").splitlines()) == 2000, r.stderr[-2000:]


def test_eval_onto_a_full_disk_resumes_from_what_was_written(small_disk, tiny_data, qlora_run):
    ballast = leave_free(small_disk, 4 * 2**10)  # room for a few predictions, not for all and the report
    out = small_disk / "eval"
    args = ["eval", "--model", qlora_run, "--data", tiny_data["heldout"], "--task", "llava", "--image-folder",
            tiny_data["images"], "--out", out, "--batch-size", "1", "--max-new-tokens", "4"]
    one_error_line(run(*args))
    assert not (out / "metrics.json").exists() and not (out / "report.md").exists()
    ballast.unlink()
    r = run(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["n"] == 8 and len((out / "predictions.jsonl").read_text().splitlines()) == 8


def test_export_onto_a_full_disk_leaves_nothing_that_looks_exported(small_disk, demo_run):
    pytest.importorskip("gguf")
    out, _ = demo_run
    ballast = leave_free(small_disk, 256 * 2**10)
    (small_disk / "gguf").mkdir()  # an empty directory made beforehand: export may use it, and must clean it
    one_error_line(run("export", "gguf", out / "tune", small_disk / "gguf"))
    assert list((small_disk / "gguf").iterdir()) == []
    ballast.unlink()
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    r = run("export", "gguf", out / "tune", small_disk / "gguf")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {p.suffix for p in (small_disk / "gguf").iterdir()} == {".gguf", "", ".md"}
