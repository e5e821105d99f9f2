"""The memory planner: exact parameter counts, LoRA and 4-bit storage as peft and bitsandbytes really make them,
monotone estimates, the verdict and its suggestion, the CLI's exit codes, and one measured training step."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qilin_lite.config import REPO_RECIPES
from qilin_lite.errors import UserError
from qilin_lite.plan import (
    CLIP_VIT_L14_336,
    LLAMA2_13B,
    GiB,
    Settings,
    count_parameters,
    estimate,
    llava_config,
    make_plan,
    nf4_bytes,
    parse_memory,
    plan_recipe,
    plan_to_dict,
)

ROOT = Path(__file__).resolve().parents[1]
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, projection_dim=64)
LLM = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=600, rms_norm_eps=1e-5, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_config():
    return llava_config(VISION, LLM)


@pytest.fixture(scope="module")
def shape13b():
    return count_parameters(llava_config(CLIP_VIT_L14_336, LLAMA2_13B))


def _model(config):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config)


def n(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "linear"])
def test_meta_counts_equal_an_instantiated_model_group_by_group(projector):
    config = llava_config(VISION, LLM, projector)
    shape = count_parameters(config)
    m = _model(config)
    lm = m.model.language_model
    linear = sum(n(mod) for name, mod in m.named_modules()
                 if isinstance(mod, torch.nn.Linear) and name.startswith("model.language_model.layers."))
    assert shape.vision == n(m.model.vision_tower)
    assert shape.projector == n(m.model.multi_modal_projector)
    assert shape.decoder_linear == linear
    assert shape.decoder_other == n(lm.layers) - linear
    assert (shape.embeddings, shape.final_norm, shape.lm_head) == (n(lm.embed_tokens), n(lm.norm), n(m.lm_head))
    assert shape.total == n(m)
    assert shape.vocab == LLM["vocab_size"] + 1 and shape.image_tokens == (32 // 8) ** 2
    assert shape.kv_dim == 2 * 32 and len(shape.linears) == 7 * LLM["num_hidden_layers"]


def test_13b_counts_are_the_known_figures(shape13b):
    assert shape13b.vision == 303_507_456  # CLIP ViT-L/14-336 vision tower
    assert shape13b.projector == 1024 * 5120 + 5120 + 5120 * 5120 + 5120
    assert shape13b.decoder_linear == 40 * (4 * 5120 * 5120 + 3 * 5120 * 13824)
    assert shape13b.embeddings == shape13b.lm_head == 32001 * 5120
    assert shape13b.image_tokens == 576 and shape13b.vision_tokens == 577


def test_lora_count_equals_peft(tiny_config):
    from qilin_lite.train.stages import LoraSettings, configure

    shape = count_parameters(tiny_config)
    model = configure(_model(tiny_config), "lora", LoraSettings(r=4, alpha=8))
    lora = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and "lora_" in name)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora == shape.lora_params(4)
    s = Settings(mode="lora", lora_r=4, per_device_batch=1, global_batch=1, max_length=64, device="cpu")
    assert estimate(shape, s).trainable == trained  # LoRA + the projector's trained copy


def test_nf4_bytes_match_bitsandbytes_storage(tiny_config, tmp_path):
    from qilin_lite.model import load_vlm

    _model(tiny_config).save_pretrained(tmp_path)
    model = load_vlm(str(tmp_path), bits=4, dtype="float32", attn="sdpa")
    storages: dict[int, int] = {}
    numels = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if w is None or w.__class__.__name__ != "Params4bit":
            continue
        numels += w.quant_state.shape.numel()
        qs = w.quant_state
        for t in (w, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code):
            if torch.is_tensor(t):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    actual = sum(storages.values())
    shape = count_parameters(tiny_config)
    assert numels == shape.decoder_linear  # exactly the decoder's linear layers are quantized
    predicted = sum(nf4_bytes(i * o) for _, i, o, _ in shape.linears)
    assert abs(predicted / actual - 1) < 0.02, (predicted, actual)
    # the asymptotic rate: 4 bits + a uint8 absmax per 64 + an fp32 absmax per 256 x 64
    assert nf4_bytes(64 * 256 * 1000) / (64 * 256 * 1000) == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=1e-3)


def test_checkpointing_lowers_activations_and_zero3_shards_weights(shape13b):
    s = Settings(mode="full", per_device_batch=16, global_batch=128, max_length=2048, zero_stage=3, gpus=8)
    on, off = estimate(shape13b, s), estimate(shape13b, replace(s, gradient_checkpointing=False))
    assert on.activations_checkpointed < on.activations_full and on.total < off.total
    weights = []
    for g in (1, 2, 4, 8):
        est = estimate(shape13b, replace(s, gpus=g, global_batch=16 * g))
        weights.append(sum(v for k, v in est.components.items() if k.startswith("weights")))
    assert weights == sorted(weights, reverse=True) and len(set(weights)) == 4
    assert weights[0] / weights[3] == pytest.approx(8, rel=1e-3)
    # ZeRO-2 leaves the weights whole but shards the optimizer
    z2 = estimate(shape13b, replace(s, zero_stage=2))
    assert z2.components["optimizer: AdamW m, v"] == on.components["optimizer: AdamW m, v"]
    assert sum(v for k, v in z2.components.items() if k.startswith("weights")) == weights[0]
    # fewer tokens, less memory (the peak is in the backward at this batch)
    assert on.peak_phase != "optimizer step"
    assert estimate(shape13b, replace(s, max_length=1024)).total < on.total


def test_verdict_and_smallest_change(shape13b):
    paper_full = Settings(mode="full", gpus=8, gpu_memory_gib=80, per_device_batch=16, global_batch=128,
                          max_length=2048, zero_stage=3)
    assert make_plan(shape13b, paper_full).fits

    # checkpointing off: too big; a lower batch (global batch kept) is enough, and comes first
    p = make_plan(shape13b, replace(paper_full, gradient_checkpointing=False))
    assert not p.fits and p.suggestion is not None
    sug = p.suggestion
    assert sug.change.startswith("lower the per-device batch")
    assert sug.settings.per_device_batch < 16 and not sug.settings.gradient_checkpointing
    assert sug.settings.per_device_batch * sug.settings.accumulation * 8 == 128
    assert sug.flags == [f"--set train.per_device_batch={sug.settings.per_device_batch}"]
    assert sug.estimate.total <= 80 * GiB

    # bf16 LoRA of a 13B does not fit 24 GiB at any batch: 4-bit does
    lora = Settings(mode="lora", gpus=1, gpu_memory_gib=24, per_device_batch=2, global_batch=128, max_length=2048)
    p = make_plan(shape13b, lora)
    assert not p.fits and p.suggestion.flags[0] == "--qlora" and p.suggestion.settings.mode == "qlora"

    # full fine-tuning on one 80 GiB GPU: ZeRO-3 on more GPUs only comes after 4-bit
    p = make_plan(shape13b, replace(paper_full, gpus=1, zero_stage=0, global_batch=16))
    assert not p.fits and p.suggestion.settings.mode == "qlora"

    # 8k tokens without checkpointing: no batch is small enough, checkpointing (tried before ZeRO-3 and 4-bit) is
    p = make_plan(shape13b, replace(paper_full, max_length=8192, gradient_checkpointing=False))
    sug = p.suggestion
    assert not p.fits and sug.settings.gradient_checkpointing and sug.settings.mode == "full"
    assert "--set train.gradient_checkpointing=true" in sug.flags and sug.settings.zero_stage == 3
    assert sug.change.startswith("turn on gradient checkpointing")

    # nothing fits a 2 GiB GPU
    p = make_plan(shape13b, replace(lora, gpu_memory_gib=2, global_batch=2))
    assert not p.fits and p.suggestion is None


def test_settings_and_memory_sizes_are_checked():
    assert parse_memory("24GiB") == parse_memory("24GB") == parse_memory("24") == 24
    assert parse_memory("512MiB") == 0.5
    with pytest.raises(UserError, match="not a size"):
        parse_memory("lots")
    with pytest.raises(UserError, match="not a multiple"):
        Settings(per_device_batch=3, global_batch=128).accumulation
    with pytest.raises(UserError, match="mode"):
        Settings(mode="dpo")


def test_paper_recipes_plan_from_configs_alone():
    a = plan_recipe(REPO_RECIPES / "qilin-med-vl/align.yaml", gpus=8)
    f = plan_recipe(REPO_RECIPES / "qilin-med-vl/tune-full.yaml", gpus=8)
    q = plan_recipe(REPO_RECIPES / "qilin-med-vl/tune-qlora.yaml", gpu_memory="24GiB")
    assert (a.settings.zero_stage, f.settings.zero_stage, q.settings.zero_stage) == (2, 3, 0)
    # the authors' cut is 2048 text ids, an image counting one: planned as 2048 + 575 positions
    assert a.settings.max_length == f.settings.max_length == 2048 + 576 - 1
    total = plan_recipe(REPO_RECIPES / "qilin-med-vl/align.yaml", ["data.length_mode=total"], gpus=8)
    assert total.settings.max_length == 2048 and total.estimate.total < a.estimate.total
    assert f.fits and q.fits
    # every sequence at 2623 positions in a batch of 32 is past 80 GB: the planner says so and keeps the global batch
    assert not a.fits and a.suggestion.settings.per_device_batch == 16 and a.suggestion.settings.global_batch == 256
    d = plan_to_dict(q)
    assert d["parameters"]["total"] == q.shape.total and d["fits"] and d["suggestion"] is None
    assert d["total_gib"] == pytest.approx(sum(d["memory_gib"].values()), abs=0.05)
    assert d["settings"]["accumulation"] == 128


def test_prefer_and_reinforce_plan_their_rows_and_reference():
    """DPO scores a pair's two replies in one micro-batch, GRPO a question's G answers; --full keeps a frozen copy of
    the starting weights as the reference (LoRA switches its adapter off instead)."""
    tune = plan_recipe(REPO_RECIPES / "qilin-med-vl/tune-lora.yaml", ["train.per_device_batch=4",
                                                                      "train.global_batch=64"])
    dpo = plan_recipe(REPO_RECIPES / "qilin-med-vl/prefer-lora.yaml")
    assert dpo.settings.per_device_batch == 2 * 4 and dpo.settings.accumulation == tune.settings.accumulation
    assert dpo.estimate.total > tune.estimate.total
    assert not any("reference" in k for k in dpo.estimate.components)
    full = plan_recipe(REPO_RECIPES / "qilin-med-vl/prefer-lora.yaml", ["train.mode=full"], gpus=8)
    ref = full.estimate.components["weights: reference model (frozen copy)"]
    assert ref == full.shape.total * 2  # bf16, every parameter once more
    grpo = plan_recipe(REPO_RECIPES / "lingshu-7b/reinforce-lora.yaml", source="lingshu-medical-mllm/Lingshu-7B")
    assert grpo.settings.per_device_batch == 2 * 8 and grpo.settings.global_batch == 16 * 8


def test_qwen_recipes_plan_on_24_and_80_gb():
    """The Qilin curriculum on Qwen2.5-7B-Instruct: its published parameter count, `<image>` in a spare embedding
    row, the paper's global batches, and what fits where."""
    from qilin_lite.config import load_recipe

    q24 = plan_recipe(REPO_RECIPES / "qwen2.5-7b/tune-qlora.yaml", gpu_memory="24GiB")
    a24 = plan_recipe(REPO_RECIPES / "qwen2.5-7b/align.yaml", gpu_memory="24GiB")
    l80 = plan_recipe(REPO_RECIPES / "qwen2.5-7b/tune-lora.yaml", gpu_memory="80GiB")
    l24 = plan_recipe(REPO_RECIPES / "qwen2.5-7b/tune-lora.yaml", gpu_memory="24GiB")
    assert q24.shape.llm == 7_615_616_512  # Qwen2.5-7B-Instruct's model card: 7.61B
    assert q24.shape.vocab == 152064  # the padded vocabulary holds <image>: no row added
    assert q24.fits and a24.fits and l80.fits and not l24.fits
    assert q24.estimate.total < l80.estimate.total
    for name, batch in (("align", 256), ("tune-qlora", 128), ("tune-lora", 128)):
        r = load_recipe(str(REPO_RECIPES / f"qwen2.5-7b/{name}.yaml"))
        paper = load_recipe(str(REPO_RECIPES / f"qilin-med-vl/{'align' if name == 'align' else 'tune-full'}.yaml"))
        assert r.train.global_batch == paper.train.global_batch == batch
        assert r.data.max_length == paper.data.max_length and r.train.epochs == paper.train.epochs


def test_several_separate_images_are_planned_as_their_tokens():
    """--images N: each image its own 576 tokens (text cut: 2048 + N x 575 positions), N towers' activations; a
    composite template refuses it (its images are one)."""
    one = plan_recipe(REPO_RECIPES / "qwen2.5-7b/tune-qlora.yaml", gpu_memory="24GiB")
    six = plan_recipe(REPO_RECIPES / "qwen2.5-7b/tune-qlora.yaml", gpu_memory="24GiB", images=6)
    assert (one.settings.max_length, six.settings.max_length) == (2048 + 575, 2048 + 6 * 575)
    assert six.estimate.total > one.estimate.total
    from qilin_lite.plan.cli import format_plan

    assert not six.fits and "--images 6" in format_plan(six)  # the suggested re-check keeps the image count
    with pytest.raises(UserError, match="joins several images into one composite"):
        plan_recipe(REPO_RECIPES / "qilin-med-vl/tune-qlora.yaml", gpu_memory="24GiB", images=2)
    with pytest.raises(UserError, match="takes at most 6"):
        plan_recipe(REPO_RECIPES / "qwen2.5-7b/tune-qlora.yaml", images=7)


def test_fsdp_recipe_plans_as_the_matching_zero_stage_with_full_logits():
    full = REPO_RECIPES / "qilin-med-vl/tune-full.yaml"
    zero3 = plan_recipe(full, gpus=8)
    fsdp = plan_recipe(full, ["train.deepspeed=null", "train.fsdp=full_shard"], gpus=8)
    grad_op = plan_recipe(full, ["train.deepspeed=null", "train.fsdp=shard_grad_op"], gpus=8)
    assert (fsdp.settings.zero_stage, grad_op.settings.zero_stage) == (3, 2)
    assert fsdp.settings.fsdp and not fsdp.settings.fused_lm_head  # train.py leaves trl's fused head under FSDP
    # same sharded weights and optimizer as ZeRO-3, plus the logits the unfused loss holds
    assert fsdp.estimate.total > zero3.estimate.total
    assert grad_op.estimate.total > fsdp.estimate.total  # weights gathered whole between forward and backward
    assert any(note.startswith("FSDP (full_shard) planned as ZeRO-3") for note in fsdp.estimate.notes)
    from qilin_lite.plan import format_plan

    assert "FSDP full_shard (planned as ZeRO-3)" in format_plan(fsdp)


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    from qilin_lite import cli

    monkeypatch.setattr(sys, "argv", ["qilin-lite", "plan", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


def test_cli_exit_codes(monkeypatch, capsys, tmp_path, tiny_config):
    qlora = REPO_RECIPES / "qilin-med-vl/tune-qlora.yaml"
    code, out = _cli(monkeypatch, capsys, qlora, "--gpu-memory", "24GiB")
    assert code == 0 and "verdict: fits" in out and "LoRA adapters (r=128)" in out

    code, out = _cli(monkeypatch, capsys, qlora, "--gpu-memory", "24GiB", "--mode", "lora", "--json")
    d = json.loads(out)
    assert code == 1 and not d["fits"] and d["suggestion"]["flags"][0] == "--qlora"
    assert d["settings"]["mode"] == "lora"

    code, out = _cli(monkeypatch, capsys, qlora, "--gpu-memory", "lots")
    assert code == 2 and out.strip() == "error: GPU memory 'lots' is not a size; write e.g. 24GiB or 80GB"
    code, out = _cli(monkeypatch, capsys, qlora, "--batch", "3")
    assert code == 2 and "not a multiple" in out

    # a local Llava directory as the base: read from its config.json
    tiny_config.save_pretrained(tmp_path / "base")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stage: tune\nmodel: {{base: {tmp_path / 'base'}}}\ndata: {{max_length: 64}}\n"
                      "train: {mode: lora, global_batch: 4, per_device_batch: 2}\n", encoding="utf-8")
    code, out = _cli(monkeypatch, capsys, recipe, "--gpu-memory", "2GiB", "--json")
    d = json.loads(out)
    assert code == 0 and d["parameters"]["total"] == count_parameters(tiny_config).total


def _benchmark():
    spec = importlib.util.spec_from_file_location("plan_accuracy", ROOT / "benchmarks" / "plan_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_predicted_peak_matches_a_measured_training_step():
    """A small LoRA run with checkpointing, measured in this process (see benchmarks/plan_accuracy.py for how)."""
    bench = _benchmark()
    r = bench.one("test-lora-ckpt")
    assert 0.85 < r["ratio"] < 1.15, r


@pytest.mark.parametrize("model, total", [
    ("Qwen/Qwen2.5-VL-7B-Instruct", 8_292_166_656),  # the hub's safetensors parameter counts
    ("google/medgemma-4b-it", 4_300_079_472),
    ("google/medgemma-27b-it", 27_432_406_640),
])
def test_native_models_count_their_released_figures(model, total):
    """Models in their own class are counted in that class, grouped by the family's module paths."""
    from qilin_lite.families import family_of_config
    from qilin_lite.plan.native import KNOWN_NATIVE, native_config, native_shape

    config = native_config(KNOWN_NATIVE[model])
    shape, _ = native_shape(config, family_of_config(config), (1024, 1024))
    assert shape.total == total
    assert shape.projector and shape.vision and shape.embeddings
    if "Qwen" in model:  # the merger is inside `model.visual`: counted once, as the projector
        assert shape.projector == 44_574_464 and shape.image_tokens == 37 * 37  # 1036 x 1036 px / 28 x 28


def test_native_qlora_counts_every_decoder_linear_as_4bit():
    """LoRA targets only q/k/v/o in Qwen-VL, but bitsandbytes quantizes every decoder linear layer (the MLP too)."""
    from qilin_lite.plan.native import KNOWN_NATIVE, native_config, native_shape
    from qilin_lite.families import family_of_config

    config = native_config(KNOWN_NATIVE["Qwen/Qwen2.5-VL-7B-Instruct"])
    shape, _ = native_shape(config, family_of_config(config), (512, 512))
    assert len(shape.linears) == 4 * 28 and len(shape.quantized) == 7 * 28
    est = estimate(shape, Settings(mode="qlora", max_length=2048))
    assert est.components["weights: LLM decoder linear"] == sum(nf4_bytes(i * o) + (2 * o if b else 0)
                                                                 for _, i, o, b in shape.quantized)


def test_native_plan_cli(monkeypatch, capsys):
    recipe = REPO_RECIPES / "lingshu-7b/tune-qlora.yaml"
    code, out = _cli(monkeypatch, capsys, recipe, "--from", "lingshu-medical-mllm/Lingshu-7B", "--image-size", "1024",
                     "--max-length", "2048", "--gpu-memory", "24GiB")
    assert code == 0 and "verdict: fits" in out
    assert "576 image tokens: a 1024 x 1024 px image, resized by its processor to 2304 patches" in out  # the recipe's max_pixels
    code, out = _cli(monkeypatch, capsys, recipe, "--from", "lingshu-medical-mllm/Lingshu-7B", "--image-size", "64x40",
                     "--max-length", "2048", "--json")
    assert code == 0 and json.loads(out)["parameters"]["total"] == 8_292_166_656
    for args, says in (
        ((), "say which with --from"),
        (("--from", "google/medgemma-4b-it"), "a gemma3 model, which this recipe's qwen2-vl template does not train"),
        (("--from", "Qwen/Qwen2.5-VL-7B-Instruct", "--image-size", "big"), "--image-size 'big': write"),
        (("--from", "no/such-model"), "no/such-model: no config for the model here and nothing is downloaded"),
    ):
        code, out = _cli(monkeypatch, capsys, recipe, *args)
        assert code == 2 and says in out and "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    code, out = _cli(monkeypatch, capsys, REPO_RECIPES / "qilin-med-vl/tune-lora.yaml", "--image-size", "512")
    assert code == 2 and "resized to the tower's 336 px" in out


def test_native_predicted_peak_matches_a_measured_training_step():
    """A small Qwen2.5-VL in its own class, LoRA, 224 px images at native resolution (benchmarks/plan_accuracy.py)."""
    bench = _benchmark()
    r = bench.one("test-qwen-vl-lora")
    assert 0.85 < r["ratio"] < 1.15, r
    rest = r["predicted"]["phases"]["rest of backward"] / r["measured"]["phases"]["rest of backward"]
    assert 0.85 < rest < 1.15, r  # past the LM head's buffers: where the layers' and the image path's terms decide
