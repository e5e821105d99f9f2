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
