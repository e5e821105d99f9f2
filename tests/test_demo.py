"""The bundled demo, end to end: the pipeline learns what the images show (the README's first command)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_learns_the_heldout_questions(tmp_path):
    from qilin_lite.demo.run import run_demo

    lines: list[str] = []
    m = run_demo(tmp_path / "demo", echo=lines.append)
    saved = json.loads((tmp_path / "demo" / "metrics.json").read_text(encoding="utf-8"))
    assert saved["accuracy_after"] == m["accuracy_after"]
    assert saved["chance"] <= 0.5
    assert saved["accuracy_after"] >= 0.9, saved
    assert saved["accuracy_before"] < saved["accuracy_after"]
    assert all(v >= 0.8 for v in saved["per_task_after"].values()), saved
    table = lines[-1]
    assert "before tuning" in table and "chance" in table
    # every stage left its part of the contract
    for d, f in (("align", "projector.safetensors"), ("tune", "adapter_model.safetensors"), ("tune", "qilin.json")):
        assert (tmp_path / "demo" / d / f).exists()
    with pytest.raises(Exception, match="not empty"):
        run_demo(tmp_path / "demo", echo=lines.append)
