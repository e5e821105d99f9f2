"""The bundled demo, end to end: the pipeline learns what the images show (the README's first command)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_learns_the_heldout_questions(demo_run):
    from qilin_lite.demo.run import run_demo

    out, lines = demo_run
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert saved["chance"] <= 0.5
    assert saved["accuracy_after"] >= 0.9, saved
    assert saved["accuracy_before"] < saved["accuracy_after"]
    assert all(v >= 0.8 for v in saved["per_task_after"].values()), saved
    table = lines[-1]
    assert "before tuning" in table and "chance" in table
    # every stage left its part of the contract
    for d, f in (("align", "projector.safetensors"), ("tune", "adapter_model.safetensors"), ("tune", "qilin.json")):
        assert (out / d / f).exists()
    # the demo trains LLaMA's kind of tokenizer (SentencePiece), which the run keeps for llama.cpp and the
    # authors' encoding
    assert (out / "tune" / "tokenizer.model").is_file()
    with pytest.raises(Exception, match="not empty"):
        run_demo(out, echo=[].append)


@pytest.mark.slow
def test_the_demo_model_needs_its_image(demo_run):
    """eval --image-blind on the demo's tuned model: right with the image, near chance without it."""
    from qilin_lite.eval.report import render_report
    from qilin_lite.eval.run import run_benchmark  # what `qilin-lite eval --image-blind` calls

    out, _ = demo_run
    chance = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["chance"]
    run_benchmark(out / "data" / "heldout.json", "llava", out / "eval-blind", model=str(out / "tune"),
                  image_folder=out / "data" / "images", image_blind=True, max_new_tokens=8, dtype="float32")
    m = json.loads((out / "eval-blind" / "metrics.json").read_text(encoding="utf-8"))
    blank = m["image_reliance"]["blank"]["metrics"]["accuracy"]
    swapped = m["image_reliance"]["swapped"]["metrics"]["accuracy"]
    assert blank["with_image"] >= 0.9 and blank["paired"]["significant"], m["image_reliance"]
    assert blank["control"] <= chance + 0.25 and swapped["control"] <= chance + 0.25, (chance, m["image_reliance"])
    assert render_report(m).splitlines()[2].startswith("**The image matters**: accuracy")


def test_demo_family_is_checked_before_any_work(tmp_path):
    """A family the demo does not build is one line naming the choices, before a file is written."""
    import subprocess
    import sys

    out = tmp_path / "d"
    r = subprocess.run([sys.executable, "-m", "qilin_lite", "demo", "--family", "qwen9", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "demo --family qwen9" in err[0] and "llava" in err[0] and "qwen2.5-vl" in err[0], err
    assert not out.exists()


@pytest.mark.slow
def test_the_native_demo_learns_in_its_own_class(tmp_path):
    """`qilin-lite demo --family qwen2.5-vl`: a tiny Qwen2.5-VL in Qwen2_5_VLForConditionalGeneration, its images at
    the processor's size, aligns (merger only) and tunes with QLoRA to the held-out accuracy the LLaVA demo reaches,
    from near chance; the runs are that family's (its template, its class) and chat reads them."""
    from qilin_lite.demo.run import run_demo

    out = tmp_path / "native"
    lines: list[str] = []
    m = run_demo(out, echo=lines.append, family="qwen2.5-vl")
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert saved["accuracy_after"] == m["accuracy_after"] and saved["family"] == "qwen2.5-vl"
    assert m["accuracy_after"] >= 0.9 and m["accuracy_before"] <= m["chance"] + 0.2, m
    assert all(v >= 0.8 for v in m["per_task_after"].values()), m
    info = json.loads((out / "tune" / "qilin.json").read_text(encoding="utf-8"))
    assert info["template"] == "qwen2-vl" and info["image_mode"] == "native", info
    assert json.loads((out / "tiny" / "config.json").read_text())["architectures"] == [
        "Qwen2_5_VLForConditionalGeneration"]
    assert "before tuning" in lines[-1] and "chance" in lines[-1]
