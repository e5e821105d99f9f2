"""merge: the merged directory computes what the run computes (PeftModel on the unquantized base, or base + trained
projector), loads with plain transformers, carries the run's template and holds no adapter tensors; runs that need
no merge, and occupied output directories, are refused with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli

from qilin_lite.families import chat_template_jinja, get_template
from qilin_lite.data.records import read_records
from qilin_lite.errors import UserError
from qilin_lite.merge import merge_run
from qilin_lite.model import PROJECTOR_FILE, RunInfo, load_llava, load_projector, resolve_base, token_layout
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
    base = load_llava(resolve_base(run, info), dtype="float32", attn="sdpa")
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
    base = load_llava(resolve_base(run, run_info), dtype="float32", attn="sdpa").eval()
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
