"""merge: the merged directory computes what the run computes (PeftModel on the unquantized base, or base + trained
projector), loads with plain transformers, carries the run's template and holds no adapter tensors; runs that need
no merge, occupied output directories, and bases other than the one the run was trained on are refused with one
line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, run_cli_captured

from qilin_lite.families import chat_template_jinja, get_template
from qilin_lite.data.records import read_records
from qilin_lite.errors import UserError
from qilin_lite.merge import merge_run
from qilin_lite.model import PROJECTOR_FILE, RunInfo, load_vlm, load_projector, resolve_base, token_layout
from qilin_lite.encoding import encode
from qilin_lite.images.pixel_values import ImageLoader
from qilin_lite.train.collator import Collator


def real_batch(records, tokenizer, image_processor, info: RunInfo, config) -> dict:
    """Two training samples with their images, padded together: what the model saw in training."""
    layout = token_layout(config, 256)
    images = ImageLoader(image_processor, info.image_mode)
    samples = []
    for rec in records[:2]:
        ids, labels = encode(rec.messages, get_template(info.template), tokenizer, layout)
        samples.append({"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                        "pixel_values": images(rec.images)})
    batch = Collator(tokenizer.pad_token_id)(samples)
    batch.pop("labels")
    return batch


def unmerged(run: Path):
    """The run as training left it, on the UNquantized base (a qlora adapter included)."""
    from peft import PeftModel

    info = RunInfo.load(run)
    base = load_vlm(resolve_base(run, info), dtype="float32", attn="sdpa")
    if info.kind == "align":
        load_projector(base, run / PROJECTOR_FILE)
        return base
    return PeftModel.from_pretrained(base, str(run))


@pytest.mark.parametrize("which", ["lora_run", "qlora_run", "align_run"])
def test_merged_model_equals_the_run(which, request, tiny_data, tmp_path, monkeypatch):
    from safetensors import safe_open
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    run = Path(request.getfixturevalue(which))
    run_info = RunInfo.load(run)
    out = tmp_path / "merged"
    assert run_cli(["merge", str(run), str(out)], monkeypatch) == 0

    info = RunInfo.load(out)
    assert (info.kind, info.base) == ("merged", None)
    assert (info.template, info.image_mode) == (run_info.template, run_info.image_mode)
    keys = [k for f in out.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]
    assert keys and not [k for k in keys if "lora_" in k or "modules_to_save" in k or "base_layer" in k]

    merged, loading = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    processor = AutoProcessor.from_pretrained(out)
    assert processor.chat_template == chat_template_jinja(get_template(run_info.template))

    data = tiny_data["align"] if run_info.kind == "align" else tiny_data["tune"]
    batch = real_batch(read_records(data, tiny_data["images"]), processor.tokenizer, processor.image_processor,
                       run_info, merged.config)
    assert batch["pixel_values"].shape[0] == 2
    reference = unmerged(run).eval()
    base = load_vlm(resolve_base(run, run_info), dtype="float32", attn="sdpa").eval()
    with torch.no_grad():
        got = merged.eval()(**batch).logits
        want = reference(**batch).logits
        untrained = base(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (got - want)[mask].abs().max().item() < 1e-4
    assert (got - untrained)[mask].abs().max().item() > 1e-3  # the training really was folded in


def test_merge_refusals(tiny_base, lora_run, tmp_path):
    with pytest.raises(UserError, match="already a standalone Llava model"):
        merge_run(tiny_base, tmp_path / "a")
    with pytest.raises(UserError, match="not a qilin-lite run directory"):
        merge_run(tmp_path, tmp_path / "b")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        merge_run(lora_run, tmp_path / "taken")
    with pytest.raises(UserError, match="must differ"):
        merge_run(lora_run, lora_run)


def other_base(base: Path, dst: Path, wider: bool = False) -> Path:
    """Another base beside `base`: its weights moved (the same shapes), or a twice-as-wide LLM, with its tokenizer."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    shutil.copytree(base, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.manual_seed(1)
    if wider:
        config = LlavaConfig.from_pretrained(base)
        config.text_config.hidden_size *= 2
        model = LlavaForConditionalGeneration(config)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_base):
    root = tmp_path_factory.mktemp("bases")
    return {"other": other_base(tiny_base, root / "other"), "wider": other_base(tiny_base, root / "wider", True)}


def refusal(monkeypatch, capsys, *args) -> str:
    """`qilin-lite merge ARGS` refused: exit 2, no traceback; its last line."""
    code, _, err = run_cli_captured(monkeypatch, capsys, "merge", *args)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("which", ["lora_run", "align_run"])
def test_merge_onto_another_base_is_refused(which, request, bases, tmp_path, monkeypatch, capsys):
    run = Path(request.getfixturevalue(which))
    recorded = RunInfo.load(run).base
    line = refusal(monkeypatch, capsys, run, tmp_path / "m", "--base", bases["other"])
    assert line.startswith(f"error: {bases['other']}: not the base {run} was trained on (same shapes, other weights: ")
    assert line.endswith(f"qilin.json names {recorded}); pass --base with the model it was trained on, or "
                         "--trust-base to merge anyway")
    line = refusal(monkeypatch, capsys, run, tmp_path / "m", "--base", bases["wider"])
    assert line.startswith(f"error: {bases['wider']}: not the base {run} was trained on (its tensor shapes differ: ")
    assert line.endswith("pass --base with the model it was trained on")  # no override: those sizes cannot merge
    # the path the run records now holds another model (a base written again over the old one)
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    info = json.loads((moved / "qilin.json").read_text())
    (moved / "qilin.json").write_text(json.dumps({**info, "base": str(bases["other"])}))
    line = refusal(monkeypatch, capsys, moved, tmp_path / "m")
    assert "not the base" in line and "it changed since training" in line
    assert not (tmp_path / "m").exists()


def test_merge_onto_the_right_base_wherever_it_lies(lora_run, tiny_base, bases, tmp_path, monkeypatch, capsys,
                                                     caplog):
    from transformers import LlavaForConditionalGeneration

    # the same base moved and saved again in bfloat16 (its weights rounded): still the run's base
    moved_base = shutil.copytree(tiny_base, tmp_path / "base-bf16", ignore=shutil.ignore_patterns("*.safetensors"))
    LlavaForConditionalGeneration.from_pretrained(tiny_base, dtype=torch.bfloat16).save_pretrained(moved_base)
    code, out, _ = run_cli_captured(monkeypatch, capsys, "merge", lora_run, tmp_path / "m1", "--base", moved_base)
    assert code == 0 and out.startswith(f"merged: {tmp_path / 'm1'}")
    # a run written before the base was recorded: merged as before, and said once; a wider base is still one line
    old = shutil.copytree(lora_run, tmp_path / "old-run")
    info = json.loads((old / "qilin.json").read_text())
    assert info.pop("base_identity")["tensors"] > 0
    (old / "qilin.json").write_text(json.dumps(info))
    caplog.clear()
    code, out, _ = run_cli_captured(monkeypatch, capsys, "merge", old, tmp_path / "m2")
    assert code == 0 and out.startswith("merged:")
    said = f"{old} records no identity of the base it was trained on (written before qilin-lite recorded it); " \
        f"merging onto {tiny_base} unchecked"
    assert [r.getMessage() for r in caplog.records if "records no identity" in r.getMessage()] == [said]
    line = refusal(monkeypatch, capsys, old, tmp_path / "m3", "--base", bases["wider"])
    assert line.startswith(f"error: {bases['wider']}: its shapes do not fit {old} (") and "pass --base" in line
    # --trust-base merges onto a same-shaped other base
    code, out, _ = run_cli_captured(monkeypatch, capsys, "merge", lora_run, tmp_path / "m4", "--base",
                                    bases["other"], "--trust-base")
    assert code == 0 and out.startswith("merged:")
