"""Padding-free packing: each sample's loss and the projector's gradient are the same packed as padded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qilin_lite.train.packing import pack
from qilin_lite.encoding import IGNORE
from qilin_lite.train.collator import Collator


def test_pack_fits_every_sample_once_and_never_overflows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 400, size=500)
    rows = pack(lengths, 512)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(lengths[r].sum() <= 512 for r in rows)
    assert lengths.sum() / (len(rows) * 512) > 0.95  # rows are nearly full
    assert pack(lengths, 512) == rows  # deterministic


def per_sample_losses(logits, labels, segments):
    """Mean CE over each sample's supervised tokens; `segments` are (row, start, end) spans."""
    out = []
    for row, a, b in segments:
        lg = logits[row, a : b - 1]
        lb = labels[row, a + 1 : b]
        out.append(torch.nn.functional.cross_entropy(lg.float(), lb, ignore_index=IGNORE, reduction="mean"))
    return torch.stack(out)


@pytest.mark.parametrize("attention", ["sdpa", "qilin_segments"])
def test_packed_loss_and_projector_gradient_equal_padded(tiny_base, tiny_data, attention):
    """Both ways a packed row trains without flash-attn: transformers' block-diagonal mask over the whole row (sdpa),
    and per-sample attention (segments.py), give each sample the loss and gradients it gets in a padded batch."""
    from qilin_lite.train import segments
    from qilin_lite.families import TEMPLATES
    from qilin_lite.data.records import read_records
    from qilin_lite.model import load_vlm, load_tokenizer_and_processor, token_layout
    from qilin_lite.train.packing import PackedDataset
    from qilin_lite.images.pixel_values import ImageLoader
    from qilin_lite.train.dataset import VisionTextDataset

    model = load_vlm(str(tiny_base), dtype="float32", attn="sdpa")
    model.config.use_cache = model.config.text_config.use_cache = False  # as train.py sets it
    tok, ip = load_tokenizer_and_processor(str(tiny_base))
    recs = read_records(tiny_data["tune"], tiny_data["images"])[:5]
    layout = token_layout(model.config, 512)
    base = VisionTextDataset(recs, tok, ImageLoader(ip), TEMPLATES["vicuna_v1"], layout, np.zeros(5, dtype=np.int64))
    items = [base[i] for i in range(5)]
    base.lengths = np.array([len(it["input_ids"]) for it in items])
    packed = PackedDataset(base, max_length=int(base.lengths.sum()))  # all five in one row
    assert len(packed) == 1

    def run(batch, segments):
        model.zero_grad()
        losses = per_sample_losses(model(**batch).logits, batch["labels"], segments)
        losses.sum().backward()
        grad = {n: p.grad.clone() for n, p in model.model.multi_modal_projector.named_parameters()}
        return losses.detach(), grad

    model.model.multi_modal_projector.requires_grad_(True)
    padded = Collator(tok.pad_token_id)(items)
    pad_losses, pad_grad = run(padded, [(k, 0, len(it["input_ids"])) for k, it in enumerate(items)])

    segments.use(model, attention)
    row = packed[0]
    order = packed.rows[0]
    batch = Collator(tok.pad_token_id)([row])
    assert "attention_mask" not in batch and batch["position_ids"][0, 0] == 0
    starts = np.cumsum([0] + [len(items[i]["input_ids"]) for i in order])
    pk_losses, pk_grad = run(batch, [(0, int(starts[j]), int(starts[j + 1])) for j in range(len(order))])
    # packed order -> sample order
    pk_by_sample = torch.zeros(5)
    for j, i in enumerate(order):
        pk_by_sample[i] = pk_losses[j]
    assert torch.allclose(pk_by_sample, pad_losses, atol=1e-5)
    for n in pad_grad:
        assert torch.allclose(pk_grad[n], pad_grad[n], atol=1e-5), n
    # and the packed row really is free of padding
    assert batch["input_ids"].shape[1] == sum(len(it["input_ids"]) for it in items)


def test_packed_training_run(tmp_path, tiny_base, tiny_data):
    from conftest import tiny_recipe

    from qilin_lite.train.stage import train_stage

    out, model = train_stage(tiny_recipe("tune", "lora", tmp_path / "p", tiny_data["tune"], tiny_data["images"],
                                     **{"model.base": str(tiny_base), "data.packing": True,
                                        "data.packing_row_length": 256,  # as given, whatever the estimate says
                                        "train.global_batch": 2, "train.per_device_batch": 2}))
    summary = json.loads((Path(out) / "train_summary.json").read_text())
    assert summary["rows"] < summary["samples"] and np.isfinite(summary["final_loss"])
    assert summary["attention"] == "qilin_segments"
    # trained with per-sample attention (the log says so), then switched back before saving: the model attends as
    # it was loaded
    assert model.config.get_text_config()._attn_implementation == "sdpa"


def _cfg(width: int, ff: int, heads: int = 8):
    from types import SimpleNamespace

    return SimpleNamespace(hidden_size=width, intermediate_size=ff, num_attention_heads=heads, num_key_value_heads=heads)


def test_packing_is_declined_when_it_saves_too_little():
    """ChiMed-VL-like tune samples (576 image tokens + a short dialog), length-grouped: padding is already small, so
    packing would save a few percent at most: off on the CPU (whose margin is larger: a packed batch costs more per
    token there) and on a GPU without flash-attn alike; with flash-attention 2 rows of max_length."""
    from qilin_lite.train.packing import PACKING_MIN_GAIN, choose_packing

    rng = np.random.default_rng(0)
    lengths = (576 + rng.lognormal(4.0, 0.6, 2000)).astype(int).tolist()
    for on_cpu in (True, False):
        c = choose_packing(lengths, 8, 2048, "sdpa", _cfg(256, 512), on_cpu=on_cpu)
        assert c.row_length is None and c.work_vs_unpacked == 1.0, on_cpu
        assert 1.0 - PACKING_MIN_GAIN < c.packed_at_max_vs_unpacked < 1.01
        assert "training unpacked" in c.reason and ("CPU" in c.reason) == on_cpu
    flash = choose_packing(lengths, 8, 2048, "flash_attention_2", _cfg(256, 512), on_cpu=False)
    assert flash.row_length == 2048 and flash.work_vs_unpacked == flash.packed_at_max_vs_unpacked < 1.01


def test_packing_pays_where_padding_dominates_with_per_sample_attention():
    """Random order, mostly short samples and a few long ones: padded batches waste most of their tokens, so packing
    pays; the estimate counts each sample's own attention (packed rows train with segments.py without flash-attn),
    and the reported ratio is that layout's own estimate."""
    from qilin_lite.train.packing import choose_packing, layout_flops, pack

    rng = np.random.default_rng(1)
    lengths = np.where(rng.random(800) < 0.1, 1500, rng.integers(40, 120, 800)).tolist()
    wide = _cfg(5120, 13824, heads=40)
    c = choose_packing(lengths, 8, 2048, "sdpa", wide, grouped=False)
    assert c.row_length is not None and c.work_vs_unpacked < 0.5 and c.attention == "qilin_segments"
    rows = pack(lengths, c.row_length)
    per_row = [[lengths[i] for i in r] for r in rows]
    assert c.row_length >= max(lengths) and all(sum(r) <= c.row_length for r in per_row)
    # a row counted as one masked L x L block would cost more than its samples' own blocks
    assert layout_flops([[i] for i in range(len(per_row))], per_row, 5120, 13824, 5120, False) > \
        layout_flops([[i] for i in range(len(per_row))], per_row, 5120, 13824, 5120)


def test_the_cpu_asks_a_larger_saving_than_a_gpu(monkeypatch):
    """Data where packing saves about 10% of the work: a GPU without flash-attn packs it (per-sample sdpa), the CPU
    trains unpacked; the device is read from device.cuda() when not given."""
    from unittest import mock

    from qilin_lite.train import segments
    from qilin_lite.train.packing import (
        PACKING_MIN_GAIN,
        PACKING_MIN_GAIN_CPU,
        choose_packing,
    )

    rng = np.random.default_rng(4)
    lengths = (576 + rng.lognormal(4.5, 0.7, 1500)).astype(int).tolist()
    monkeypatch.setattr(segments, "flex_trains", lambda dev: True)  # what a CUDA GPU with Triton answers
    gpu = choose_packing(lengths, 8, 2048, "sdpa", _cfg(256, 512), grouped=False, on_cpu=False)
    assert 1.0 - PACKING_MIN_GAIN_CPU < gpu.work_vs_unpacked < 1.0 - PACKING_MIN_GAIN
    assert gpu.row_length is not None and gpu.attention == "flex_attention"  # FlexAttention's document mask
    cpu = choose_packing(lengths, 8, 2048, "sdpa", _cfg(256, 512), grouped=False, on_cpu=True)
    assert cpu.row_length is None and "CPU" in cpu.reason
    with mock.patch("qilin_lite.train.packing.cuda", return_value=True):
        assert choose_packing(lengths, 8, 2048, "sdpa", _cfg(256, 512), grouped=False).row_length == gpu.row_length
    assert choose_packing(lengths, 8, 2048, "sdpa", _cfg(256, 512), grouped=False).row_length is None


@pytest.mark.parametrize("kernel", ["qilin_segments", "flex_attention"])
def test_per_sample_attention_equals_each_sample_alone(kernel):
    """A packed row under segments.py, or under FlexAttention with the document mask transformers builds from the
    positions (training: no cache; forward only here, torch 2.13 has no FlexAttention backward on the CPU), gives
    every sample the logits it gets alone (GQA included; a trailing padding run is a document of its own), and the
    model attends as loaded again after switching back."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from qilin_lite.train.segments import spans, use

    assert spans(torch.tensor([0, 1, 2, 0, 1, 0, 0, 1])) == [(0, 3), (3, 5), (5, 6), (6, 8)]
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=16, patch_size=8),
                      text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=200),
                      image_token_index=199)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    a, b, pad = torch.randint(0, 190, (1, 30)), torch.randint(0, 190, (1, 50)), torch.zeros(1, 7, dtype=torch.long)
    positions = torch.cat([torch.arange(30), torch.arange(50), torch.arange(7)])[None]  # as the collator pads
    with torch.no_grad():
        alone = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], 1)
        before = use(model, kernel)
        packed = model(input_ids=torch.cat([a, b, pad], 1), position_ids=positions, use_cache=False)
        use(model, before)
    assert before == "sdpa" and model.config.get_text_config()._attn_implementation == "sdpa"
    if kernel == "qilin_segments":
        assert torch.equal(packed.logits[:, :80], alone)
    else:
        torch.testing.assert_close(packed.logits[:, :80], alone, rtol=1e-4, atol=1e-5)


def test_packed_rows_take_flex_attention_on_a_cuda_gpu(monkeypatch):
    """The GPU-only choice, made to believe a GPU is present: FlexAttention on CUDA without flash-attn (where a tiny
    forward + backward runs), per-span sdpa on the CPU, flash-attention 2 kept where the model loaded with it."""
    from types import SimpleNamespace

    from qilin_lite import device

    from qilin_lite.train import segments

    from qilin_lite.train import stage as train
    from qilin_lite.train.packing import PackedDataset

    assert segments.flex_trains("cpu") is False  # torch 2.13: no FlexAttention backward on the CPU, hence segments.py
    monkeypatch.setattr(segments, "flex_trains", lambda dev: True)  # what a CUDA GPU with Triton answers

    class Model:
        def __init__(self, attn):
            self.config = SimpleNamespace(get_text_config=lambda: self.text)
            self.text = SimpleNamespace(_attn_implementation=attn)

    packed = PackedDataset.__new__(PackedDataset)
    for on_cuda, attn, want in ((True, "sdpa", "flex_attention"), (False, "sdpa", "qilin_segments"),
                                (True, "flash_attention_2", "flash_attention_2")):
        monkeypatch.setattr(device, "cuda", lambda _c=on_cuda: _c)
        model, data = Model(attn), SimpleNamespace(train=packed, attention=None)
        back = train.packed_attention(model, data)
        assert data.attention == want and model.text._attn_implementation == want
        assert back == (None if want == attn else attn)


def test_packing_decision_is_in_the_summary(tmp_path, tiny_base, tiny_data):
    from conftest import tiny_recipe

    from qilin_lite.train.stage import train_stage

    out, _ = train_stage(tiny_recipe("tune", "lora", tmp_path / "auto", tiny_data["tune"], tiny_data["images"],
                                     **{"model.base": str(tiny_base), "data.packing": True, "train.max_steps": 1,
                                        "train.global_batch": 2, "train.per_device_batch": 2}))
    summary = json.loads((Path(out) / "train_summary.json").read_text())
    p = summary["packing"]
    assert p["attention"] == ("sdpa" if p["row_length"] is None else "qilin_segments") and p["reason"]
    # declined: one sample per row; chosen: fewer rows than samples, and never more estimated work than unpacked
    assert (summary["rows"] == summary["samples"]) == (p["row_length"] is None)
    assert p["work_vs_unpacked"] <= 1.0


def test_packing_estimate_batches_as_the_training_sampler_does():
    """The estimate's unpacked batches are the ones the run's sampler yields (grouped over per-device batch x
    accumulation, the same seed), not a finer grouping of its own."""
    from qilin_lite.train.packing import choose_packing, layout_flops, pack
    from qilin_lite.train.sampler import EpochGroupedSampler

    rng = np.random.default_rng(2)
    lengths = (576 + rng.lognormal(4.0, 0.8, 600)).astype(int).tolist()
    cfg = _cfg(256, 512)
    batch, accumulation, seed = 4, 8, 3

    def work(order, per_row):
        return layout_flops([order[i:i + batch] for i in range(0, len(order), batch)], per_row, 256, 512, 256, True)

    unpacked = work(list(EpochGroupedSampler(batch * accumulation, lengths, seed)), [[n] for n in lengths])
    rows = [[lengths[i] for i in r] for r in pack(lengths, 2048)]
    packed = work(list(EpochGroupedSampler(batch * accumulation, [sum(r) for r in rows], seed)), rows)
    c = choose_packing(lengths, batch, 2048, "flash_attention_2", cfg, seed=seed, accumulation=accumulation)
    assert c.work_vs_unpacked == pytest.approx(packed / unpacked, rel=1e-12)
    finer = choose_packing(lengths, batch, 2048, "flash_attention_2", cfg, seed=seed)
    assert finer.work_vs_unpacked != c.work_vs_unpacked  # the grouping granularity matters to the estimate
