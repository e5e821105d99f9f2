"""Resume, attention choice, the added <image> token, length grouping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe
from safetensors.torch import load_file

from qilin_lite.errors import UserError


def test_align_resumed_after_interruption_ends_where_an_uninterrupted_run_ends(tmp_path, tiny_base, tiny_data):
    import shutil

    from qilin_lite.train.stage import run_stage

    out = tmp_path / "align"
    kw = {"model.base": str(tiny_base), "train.save_steps": 1, "train.save_total_limit": 5, "train.max_steps": 4}
    recipe = lambda: tiny_recipe("align", "align", out, tiny_data["align"], tiny_data["images"], **kw)  # noqa: E731
    run_stage(recipe())
    # align checkpoints hold the projector, not a copy of the frozen LLM
    ckpt = out / "checkpoint-2"
    assert (ckpt / "projector.safetensors").exists() and not list(ckpt.glob("model*.safetensors"))
    uninterrupted = load_file(str(out / "projector.safetensors"))
    # an interruption after step 2: later checkpoints and the final outputs never got written
    for p in ("checkpoint-3", "checkpoint-4", "projector.safetensors", "qilin.json"):
        shutil.rmtree(out / p) if (out / p).is_dir() else (out / p).unlink()
    with pytest.raises(UserError, match="--resume"):
        run_stage(recipe())
    run_stage(recipe(), resume=True)
    resumed = load_file(str(out / "projector.safetensors"))
    for k in uninterrupted:
        assert torch.allclose(resumed[k], uninterrupted[k], atol=1e-6), k
    assert not torch.equal(resumed["linear_1.weight"], load_file(str(ckpt / "projector.safetensors"))["linear_1.weight"])
    logged = [h["step"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert logged == [1, 2, 3, 4]


def test_attention_choice(monkeypatch):
    import importlib.util

    from qilin_lite import device as m

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert m.pick_attention("auto") == "sdpa"
    with pytest.raises(UserError, match="flash"):
        m.pick_attention("flash_attention_2")
    assert m.pick_attention("eager") == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real(n, *a))
    assert m.pick_attention("auto") == "flash_attention_2"
    assert m.pick_attention("sdpa") == "sdpa"


def test_image_token_added_and_embeddings_resized(tiny_parts, tiny_base):
    from transformers import AutoConfig, AutoTokenizer

    llm_tok = AutoTokenizer.from_pretrained(str(tiny_parts[1]))
    assert "<image>" not in llm_tok.get_vocab()
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    cfg = AutoConfig.from_pretrained(str(tiny_base))
    assert tok.convert_tokens_to_ids("<image>") == cfg.image_token_id == len(llm_tok)
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.image_seq_length == (32 // 8) ** 2


def test_batches_are_grouped_by_length_unless_turned_off(tmp_path, tiny_base, tiny_data):
    import random

    from qilin_lite.train.sampler import EpochGroupedSampler
    from qilin_lite.train.trainer import QilinTrainer

    trainer = QilinTrainer.__new__(QilinTrainer)  # only the sampler hook is exercised
    # 64 samples, short and long interleaved: transformers groups within megabatches of 8 batches
    trainer.sample_lengths = [5 + i % 8 if i % 2 else 50 + i % 8 for i in range(64)]

    class Args:
        train_batch_size, gradient_accumulation_steps, seed, data_seed = 2, 1, 0, None

    trainer.args = Args()
    sampler = trainer._get_train_sampler(None)
    assert isinstance(sampler, EpochGroupedSampler)
    order = list(sampler)

    def padding(o):
        return sum(abs(trainer.sample_lengths[o[i]] - trainer.sample_lengths[o[i + 1]]) for i in range(0, 64, 2))

    shuffled = list(range(64))
    random.Random(0).shuffle(shuffled)
    assert sorted(order) == list(range(64))
    assert padding(order) < 0.3 * padding(shuffled)  # long with long, short with short
    # the order is a function of (seed, epoch) alone: what an exact resume relies on
    assert list(sampler) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    sampler.set_epoch(0)
    assert list(sampler) == order


def test_align_with_a_4bit_frozen_llm_trains_only_the_projector(tmp_path, tiny_base, tiny_data):
    import bitsandbytes as bnb

    from qilin_lite.train.stage import train_stage

    out, model = train_stage(tiny_recipe("align", "align", tmp_path / "a4", tiny_data["align"], tiny_data["images"],
                                         **{"model.base": str(tiny_base), "model.load_4bit": True}))
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(".language_model." in n for n in four_bit)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("multi_modal_projector" in n for n in trainable)
    info = json.loads((Path(out) / "qilin.json").read_text())
    assert info["kind"] == "align"
    trained = load_file(str(Path(out) / "projector.safetensors"))
    base = {}
    for f in Path(tiny_base).glob("*.safetensors"):
        base.update(load_file(str(f)))
    fresh = {k.split("multi_modal_projector.")[1]: v for k, v in base.items() if "multi_modal_projector" in k}
    assert set(trained) == set(fresh) and all(not torch.equal(trained[k], fresh[k]) for k in trained)


def test_trained_weights_are_fp32_frozen_ones_keep_the_load_dtype(tmp_path, tiny_base, tiny_data):
    """bf16 recipes: AdamW must update fp32 weights, or small updates vanish in bf16 rounding."""
    from qilin_lite.train.stage import train_stage

    out, model = train_stage(tiny_recipe("align", "align", tmp_path / "bf", tiny_data["align"], tiny_data["images"],
                                         **{"model.base": str(tiny_base), "model.dtype": "bfloat16", "train.max_steps": 1}))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "multi_modal_projector" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "language_model" in n or "vision_tower" in n)


def test_lora_init_follows_the_recipe_seed(tmp_path, align_run, tiny_data):
    """LoRA's A matrices are drawn before the Trainer seeds: the same seed must give the same run (and every
    process of a sharded run the same adapter), another seed another one."""
    from qilin_lite.train.stage import run_stage

    def adapter(name: str, seed: int) -> dict:
        r = tiny_recipe("tune", "lora", tmp_path / name, tiny_data["tune"], tiny_data["images"],
                        **{"model.from_run": str(align_run), "train.max_steps": 1, "train.seed": seed})
        return load_file(str(run_stage(r) / "adapter_model.safetensors"))

    a, b, c = adapter("a", 7), adapter("b", 7), adapter("c", 8)
    lora_a = [k for k in a if "lora_A" in k]
    assert lora_a and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in lora_a)


def test_eval_loss_is_the_held_out_supervised_token_loss(tmp_path, align_run, tiny_data):
    """--eval-data: the logged eval loss is the mean loss over exactly the held-out replies' tokens, evaluated with
    the weights of that step (here the final ones), and it is in the summary and the curve."""
    from qilin_lite.train.collator import Collator
    from qilin_lite.train.stage import train_stage
    from qilin_lite.train.data import build_dataset

    rows = json.loads(Path(tiny_data["tune"]).read_text(encoding="utf-8"))
    held = tmp_path / "留出集.json"
    held.write_text(json.dumps(rows[:4], ensure_ascii=False), encoding="utf-8")
    recipe = tiny_recipe("tune", "lora", tmp_path / "run", tiny_data["tune"], tiny_data["images"],
                         **{"model.from_run": str(align_run), "data.eval": str(held), "train.eval_steps": 1})
    out, model = train_stage(recipe)
    history = json.loads((out / "log_history.json").read_text())
    evals = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    assert sorted(evals) == [1, 2]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["eval_samples"] == 4 and summary["final_eval_loss"] == evals[2]

    from qilin_lite.model import load_tokenizer_and_processor

    tok, ip = load_tokenizer_and_processor(str(out))
    held_set, _ = build_dataset(recipe, tok, ip, model.config, tmp_path / "check", source=str(held))
    batch = Collator(tok.pad_token_id)([held_set[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    nll = torch.nn.functional.cross_entropy(logits[:, :-1][mask], labels[mask])
    assert abs(nll.item() - evals[2]) < 1e-4, (nll.item(), evals[2])


def test_metrics_only_on_logging_steps_train_the_same_weights(tmp_path, align_run, tiny_data, monkeypatch):
    """trl computes token entropy and top-1 accuracy in its fused head on every micro-batch; qilin-lite computes them
    only for the steps that log. Through trl's head (a GPU: made to look so here) the same loss and weights to the
    bit; through lm_head.py's plain head (the CPU) likewise to the bit between the two, trl's kernel never called,
    and to float rounding against trl's head. Same logged token count; the metrics are still in every log."""
    from trl.trainer import utils as trl_utils

    from qilin_lite.train import lm_head
    from qilin_lite.train import trainer as trainer_mod
    from qilin_lite.train.stage import train_stage

    calls: list[tuple[str, ...]] = []
    real = trl_utils._ChunkedLogProbFunction.apply

    def spy(*args):
        calls.append(tuple(args[-1]))  # the per-token outputs this call computes
        return real(*args)

    metric_calls: list[bool] = []
    real_head = lm_head.supervised_head

    def head_spy(*args, metrics=False, **kwargs):
        metric_calls.append(metrics)
        return real_head(*args, metrics=metrics, **kwargs)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy)
    monkeypatch.setattr(trainer_mod, "supervised_head", head_spy)
    runs = {}
    for name, lean, plain in (("fused", True, False), ("trl", False, False), ("plain", True, True),
                              ("plain-full", False, True)):
        calls.clear()
        metric_calls.clear()
        monkeypatch.setattr(trainer_mod, "plain_head_for", lambda device, _p=plain: _p)
        recipe = tiny_recipe("tune", "lora", tmp_path / name, tiny_data["tune"], tiny_data["images"],
                             **{"model.from_run": str(align_run), "train.max_steps": 6, "train.logging_steps": 3,
                                "train.global_batch": 4, "train.per_device_batch": 2, "train.lean_metrics": lean})
        out, model = train_stage(recipe)
        history = json.loads((out / "log_history.json").read_text(encoding="utf-8"))
        runs[name] = (dict(calls=list(calls), metric_calls=list(metric_calls), history=history,
                           weights={k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}))
    steps = lambda h: [e for e in h if "loss" in e and "train_loss" not in e]  # noqa: E731
    # 6 steps x 2 micro-batches; the full path asks for entropy + top-1 on all 12, the lean one on the last
    # micro-batch of steps 3 and 6 only
    assert sum("entropy" in c for c in runs["trl"]["calls"]) == 12
    assert sum("entropy" in c for c in runs["fused"]["calls"]) == 2 and len(runs["fused"]["calls"]) == 12
    assert runs["plain"]["calls"] == runs["plain-full"]["calls"] == []
    assert runs["plain"]["metric_calls"].count(True) == 2 and len(runs["plain"]["metric_calls"]) == 12
    assert runs["plain-full"]["metric_calls"] == [True] * 12
    for one, other in (("fused", "trl"), ("plain", "plain-full")):
        for k, w in runs[other]["weights"].items():
            assert torch.equal(w, runs[one]["weights"][k]), (one, k)
        assert [e["loss"] for e in steps(runs[one]["history"])] == [e["loss"] for e in steps(runs[other]["history"])]
    for k, w in runs["trl"]["weights"].items():
        # Adam divides by the gradient's running size: a rounding-level gradient difference on a near-zero gradient
        # moves a weight by up to ~lr x steps (1.2e-3 here); 1e-5 is 1% of that
        torch.testing.assert_close(runs["plain"]["weights"][k], w, rtol=1e-4, atol=1e-5)
    logs = [steps(runs[n]["history"]) for n in ("fused", "trl", "plain", "plain-full")]
    assert len(logs[0]) == 2
    for a, b, c, d in zip(*logs):
        assert a["num_tokens"] == b["num_tokens"] == c["num_tokens"] == d["num_tokens"]
        assert float(c["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
        for e in (a, c):
            assert "entropy" in e and "mean_token_accuracy" in e
        # the lean logs hold their last micro-batch's metrics, the full ones every micro-batch's since the last log
        for ours, theirs in ((c, a), (d, b)):
            assert ours["entropy"] == pytest.approx(theirs["entropy"], rel=1e-4)
            assert ours["mean_token_accuracy"] == pytest.approx(theirs["mean_token_accuracy"], abs=0.02)


def test_the_plain_head_gives_trls_outputs_and_gradients():
    """lm_head.py against trl's fused head on one batch: per-token log-probabilities (zero where unsupervised), the
    loss and every gradient equal to float rounding, the entropy too and the top-1 hits exactly; a batch with
    nothing supervised still backpropagates."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )
    from trl.trainer.utils import add_fused_lm_head

    from qilin_lite.train.lm_head import plain_head_ok, supervised_head

    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=16, patch_size=8),
                      text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, vocab_size=300), image_token_index=299)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    assert plain_head_ok(model)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(0, 290, (3, 40))
    ids[0, 26:40] = ids[0, 25]  # a row the model can guess: some top-1 hits
    labels = ids.clone()
    labels[:, :25] = -100
    labels[2] = -100  # a row with nothing supervised
    results = []
    for plain in (False, True):
        model.zero_grad()
        out = supervised_head(model, input_ids=ids, labels=labels, metrics=True) if plain else \
            model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        results.append((out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (trl, g_t), (ours, g_p) = results
    mask = ours.label_mask
    assert torch.equal(trl.label_mask, mask) and mask.sum() == 2 * 15  # positions 25-39 of two rows
    assert torch.all(ours.log_probs[~mask] == 0) and torch.all(ours.log_probs[mask] < 0)
    torch.testing.assert_close(ours.log_probs, trl.log_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.loss, trl.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.entropy, trl.entropy.detach(), rtol=1e-5, atol=1e-6)
    assert torch.all(ours.entropy[mask] > 0) and torch.all(ours.entropy[~mask] == 0)
    assert torch.equal(ours.is_top1.bool(), trl.is_top1.bool())
    assert g_t.keys() == g_p.keys() and "lm_head.weight" in g_p
    for k in g_t:
        torch.testing.assert_close(g_p[k], g_t[k], rtol=1e-4, atol=1e-6)
    lean = supervised_head(model, input_ids=ids, labels=labels)
    assert lean.entropy is None and lean.is_top1 is None and torch.equal(lean.loss, ours.loss)
    nothing = torch.full_like(labels, -100)
    out = supervised_head(model, input_ids=ids, labels=nothing)
    out.loss.backward()
    assert out.loss.item() == 0.0


def test_host_cuts_train_and_log_as_the_trainers_own_steps(tmp_path, align_run, tiny_data, monkeypatch):
    """QilinTrainer skips the Trainer's per-micro-batch module walks (model.train(), the FLOPs count) and keeps its
    NaN/inf filter of the logged loss on the device. Against the Trainer's own methods, with LoRA dropout on (so a
    model left in eval mode after an evaluation would train other weights), an evaluation mid-run and a NaN loss
    on one micro-batch: the same weights to the bit, the same logs, the same FLOPs total."""
    from transformers import Trainer
    from trl import SFTTrainer

    import qilin_lite.train.stage as train_mod
    from qilin_lite.train.trainer import QilinTrainer

    ours_cls = QilinTrainer
    poisoned = 5  # micro-batch whose loss reads NaN (the gradient is untouched: NaN + loss is constant in NaN)

    def poison(cls):
        class Poisoned(cls):
            seen = 0

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                Poisoned.seen += model.training
                return loss + float("nan") if model.training and Poisoned.seen == poisoned else loss

        return Poisoned

    class TrainersOwn(ours_cls):  # the same trainer with the Trainer's own per-micro-batch code
        train = SFTTrainer.train
        training_step = SFTTrainer.training_step
        floating_point_ops = Trainer.floating_point_ops

    runs = {}
    for name, cls in (("ours", ours_cls), ("trainer", TrainersOwn)):
        recipe = tiny_recipe("tune", "lora", tmp_path / name, tiny_data["tune"], tiny_data["images"],
                             **{"model.from_run": str(align_run), "train.max_steps": 6, "train.logging_steps": 2,
                                "train.global_batch": 4, "train.per_device_batch": 2, "train.lora_dropout": 0.3,
                                "data.eval": str(tiny_data["tune"]), "train.eval_steps": 3})
        out, model = train_mod.train_stage(recipe, trainer_cls=poison(cls))
        runs[name] = (json.loads((out / "log_history.json").read_text(encoding="utf-8")),
                      {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad})
    (h_ours, w_ours), (h_trainer, w_trainer) = runs["ours"], runs["trainer"]
    for k, w in w_trainer.items():
        assert torch.equal(w, w_ours[k]), k
    losses = lambda h: [(e["step"], e["loss"]) for e in h if "loss" in e]  # noqa: E731
    assert losses(h_ours) == losses(h_trainer) and len(losses(h_ours)) == 3
    assert all(loss == loss for _, loss in losses(h_ours))  # the NaN was filtered, not logged
    assert [e["eval_loss"] for e in h_ours if "eval_loss" in e] == [e["eval_loss"] for e in h_trainer if "eval_loss" in e]
    total = lambda h: next(e["total_flos"] for e in h if "total_flos" in e)  # noqa: E731
    assert total(h_ours) == total(h_trainer) > 0
