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
    import os
    import subprocess
    import sys
    from pathlib import Path

    out, _ = demo_run
    chance = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["chance"]
    cli = str(Path(sys.executable).with_name("qilin-lite"))
    r = subprocess.run([cli, "eval", "--model", str(out / "tune"), "--data", str(out / "data" / "heldout.json"),
                        "--task", "llava", "--image-folder", str(out / "data" / "images"), "--out",
                        str(out / "eval-blind"), "--image-blind", "--max-new-tokens", "8", "--dtype", "float32"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "eval-blind" / "metrics.json").read_text(encoding="utf-8"))
    blank = m["image_reliance"]["blank"]["metrics"]["accuracy"]
    swapped = m["image_reliance"]["swapped"]["metrics"]["accuracy"]
    assert blank["with_image"] >= 0.9 and blank["paired"]["significant"], m["image_reliance"]
    assert blank["control"] <= chance + 0.25 and swapped["control"] <= chance + 0.25, (chance, m["image_reliance"])
    assert r.stdout.splitlines()[2].startswith("**The image matters**: accuracy")
