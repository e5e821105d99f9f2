"""Exactly the right weights train in each mode, and every output directory reloads in plain transformers/peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qilin_lite.model import load_vlm, load_run


def base_state(base: Path) -> dict[str, torch.Tensor]:
    """The base's weights under in-memory names (transformers writes Llava files in the hub's legacy key layout)."""
    return {k: v.clone() for k, v in load_vlm(str(base), dtype="float32", attn="sdpa").state_dict().items()}


def group(name: str) -> str:
    for g in ("vision_tower", "multi_modal_projector", "language_model", "lm_head"):
        if g in name:
            return g
    return "other"


def changed_groups(before: dict, after: dict) -> dict[str, tuple[int, int]]:
    """group -> (tensors changed, tensors compared)."""
    res: dict[str, list[int]] = {}
    for k, v in before.items():
        g = group(k)
        c = res.setdefault(g, [0, 0])
        c[1] += 1
        c[0] += int(not torch.equal(v, after[k].to(v.dtype)))
    return {g: tuple(c) for g, c in res.items()}


def test_align_changes_the_projector_and_nothing_else(tiny_base, align_run, in_memory):
    before = base_state(tiny_base)
    model = in_memory[str(align_run)]
    after = model.state_dict()
    ch = changed_groups(before, after)
    assert ch["multi_modal_projector"][0] == ch["multi_modal_projector"][1] == 4
    assert ch["vision_tower"][0] == 0 and ch["language_model"][0] == 0 and ch["lm_head"][0] == 0
    # the saved projector is the trained one
    saved = load_file(str(align_run / "projector.safetensors"))
    for k, v in saved.items():
        assert torch.equal(v, after["model.multi_modal_projector." + k])


def _lora_tensors(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_lora_modes_train_adapters_and_projector_only(mode, request, tiny_base, align_run, in_memory):
    run = request.getfixturevalue(f"{mode}_run")
    model = in_memory[str(run)]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # LoRA on every linear layer of the LLM decoder, never on the vision tower or projector
    lora = {n for n in trainable if "lora_" in n}
    assert lora and all("language_model" in n for n in lora)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    others = trainable - lora
    assert others and all("multi_modal_projector" in n and "modules_to_save" in n for n in others)
    # B matrices start at zero: any non-zero B proves the adapters trained
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # the projector started from align's and moved
    align_proj = load_file(str(align_run / "projector.safetensors"))
    proj = {n.split("modules_to_save.default.")[1]: p for n, p in model.named_parameters()
            if "modules_to_save" in n and "multi_modal_projector" in n}
    assert set(proj) == set(align_proj)
    assert all(not torch.equal(proj[k].float(), align_proj[k].float()) for k in proj)
    # frozen base weights are bit-identical to the base (4-bit ones are checked as 4-bit below)
    before = base_state(tiny_base)
    base_params = {n.replace(".base_layer", ""): p for n, p in model.get_base_model().named_parameters()}
    checked = 0
    for k, v in before.items():
        p = base_params.get(k)
        if p is not None and p.dtype.is_floating_point and p.shape == v.shape and "multi_modal_projector" not in k:
            assert torch.equal(p.detach().to(v.dtype), v), k
            checked += 1
    # lora: every base tensor; qlora: all but the 4-bit decoder weights
    assert checked >= sum(1 for k in before if "vision_tower" in k or "norm" in k) + 2


def test_qlora_quantizes_only_llm_decoder_layers(qlora_run):
    import bitsandbytes as bnb

    model, *_ = load_run(qlora_run, bits=4, dtype="float32")
    four_bit, plain = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            four_bit.append(name)
        elif isinstance(mod, torch.nn.Linear) and "lora_" not in name:
            plain.append(name)
    assert four_bit and all(".language_model.layers." in n for n in four_bit)
    assert any("multi_modal_projector" in n for n in plain)
    assert any(n.endswith("lm_head") for n in plain)
    assert any("vision_tower" in n for n in plain)
    assert not any("multi_modal_projector" in n or "vision_tower" in n or "lm_head" in n for n in four_bit)


def test_qlora_keeps_frozen_weights_in_the_load_dtype_and_norms_in_fp32(tiny_base):
    """peft's prepare_model_for_kbit_training would hold the vision tower, embeddings and lm_head in fp32 (2.7 GiB
    at 13B); QLoRA's layout keeps only the norms there. Trained weights are fp32 (train.py)."""
    from qilin_lite.train.stages import LoraSettings, configure
    from qilin_lite.train.trainer import trainable_to_fp32

    model = load_vlm(str(tiny_base), bits=4, dtype="bfloat16", attn="sdpa")
    model = configure(model, "qlora", LoraSettings(r=4, alpha=8))
    trainable_to_fp32(model)
    by_kind: dict[str, set] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = "trained"
        elif type(p).__name__ == "Params4bit":
            kind = "4-bit"
        elif "norm" in name:
            kind = "norm"
        else:
            kind = "frozen"
        by_kind.setdefault(kind, set()).add(p.dtype)
    assert by_kind["trained"] == {torch.float32}
    assert by_kind["norm"] == {torch.float32}
    assert by_kind["frozen"] == {torch.bfloat16}  # vision tower, embeddings, lm_head, the projector's frozen original
    assert by_kind["4-bit"] == {torch.uint8}


def test_full_trains_llm_and_projector_never_the_vision_tower(tiny_base, full_run, in_memory):
    before = base_state(tiny_base)
    after = in_memory[str(full_run)].state_dict()
    ch = changed_groups(before, after)
    assert ch["vision_tower"][0] == 0
    assert ch["multi_modal_projector"][0] == ch["multi_modal_projector"][1]
    assert ch["language_model"][0] == ch["language_model"][1]  # every decoder tensor moved
    assert ch["lm_head"][0] == 1


def _batch(run_dir, tiny_data):
    """One real training batch from the run's own data path."""
    from transformers import AutoConfig

    from qilin_lite.families import get_template
    from qilin_lite.model import RunInfo, load_tokenizer_and_processor, token_layout
    from qilin_lite.encoding import encode
    from qilin_lite.images.pixel_values import ImageLoader
    from qilin_lite.train.collator import Collator

    info = RunInfo.load(Path(run_dir))
    tok, ip = load_tokenizer_and_processor(str(run_dir))
    base = Path(run_dir) / "config.json"
    cfg = AutoConfig.from_pretrained(run_dir if base.exists() else json.loads((Path(run_dir) / "adapter_config.json").read_text())["base_model_name_or_path"])
    rec = json.loads(Path(tiny_data["tune"]).read_text(encoding="utf-8"))[0]
    msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in rec["conversations"]]
    ids, labels = encode(msgs, get_template(info.template), tok, token_layout(cfg, 512))
    pix = ImageLoader(ip, info.image_mode)([Path(tiny_data["images"]) / rec["image"]])
    return Collator(tok.pad_token_id)([{"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels), "pixel_values": pix}])


@torch.no_grad()
def test_lora_run_reloads_in_plain_transformers_and_peft_with_same_logits(lora_run, tiny_data, in_memory):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    cfg = json.loads((lora_run / "adapter_config.json").read_text())
    base = LlavaForConditionalGeneration.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(lora_run)).eval()
    mem = in_memory[str(lora_run)].eval()
    batch = _batch(lora_run, tiny_data)
    a = plain(**batch).logits
    b = mem(**batch).logits
    assert torch.allclose(a, b, atol=1e-5)


@torch.no_grad()
def test_full_run_reloads_in_plain_transformers_with_same_logits(full_run, tiny_data, in_memory):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    plain = LlavaForConditionalGeneration.from_pretrained(str(full_run), dtype=torch.float32).eval()
    AutoProcessor.from_pretrained(str(full_run))  # the processor (with chat template) loads too
    batch = _batch(full_run, tiny_data)
    assert torch.allclose(plain(**batch).logits, in_memory[str(full_run)].eval()(**batch).logits, atol=1e-5)


def test_align_projector_is_carried_into_tune(tmp_path, tiny_base, align_run, tiny_data, in_memory):
    """tune --from ALIGN starts from align's projector, not the base's fresh one (lr ~0 isolates the start)."""
    from conftest import tiny_recipe

    from qilin_lite.train.stage import train_stage

    out, model = train_stage(tiny_recipe("tune", "lora", tmp_path / "t", tiny_data["tune"], tiny_data["images"],
                                         **{"model.from_run": str(align_run), "train.lr": 1e-12, "train.max_steps": 1}))
    aligned = load_file(str(align_run / "projector.safetensors"))
    fresh = base_state(tiny_base)
    proj = {n.split("modules_to_save.default.")[1]: p for n, p in model.named_parameters()
            if "modules_to_save" in n and "multi_modal_projector" in n}
    for k, v in proj.items():
        assert torch.allclose(v.detach(), aligned[k], atol=1e-8)
        assert not torch.allclose(v.detach(), fresh["model.multi_modal_projector." + k], atol=1e-4)


def test_saved_processor_prompts_like_training(lora_run):
    """The chat template saved beside the weights renders the same string as the training template."""
    from transformers import AutoTokenizer

    from qilin_lite.families import TEMPLATES, render

    tok = AutoTokenizer.from_pretrained(str(lora_run))
    msgs = [{"role": "user", "content": "<image>\n病灶位于哪一侧？"}, {"role": "assistant", "content": "左侧"},
            {"role": "user", "content": "这是什么类型的影像？"}]
    jinja = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert jinja == render(msgs, TEMPLATES["vicuna_v1"], add_generation_prompt=True).text


def test_a_4bit_model_that_answers_mid_training_keeps_differentiable_kernels(tiny_data, align_run, tmp_path):
    """An eval-mode forward (evaluation, --eval-task, reinforce's sampling) must not switch a QLoRA model's 4-bit
    layers to bitsandbytes' CPU inference kernel, which has no autograd formula."""
    import warnings

    import torch
    from conftest import tiny_recipe

    from qilin_lite.train.stage import load_model

    r = tiny_recipe("tune", "qlora", tmp_path / "o", tiny_data["tune"], tiny_data["images"],
                    **{"model.from_run": str(align_run)})
    _, model, _, _ = load_model(r, tmp_path / "o")
    ids = torch.randint(5, 50, (2, 12))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model(input_ids=ids, labels=ids).loss.backward()
    assert not [w for w in seen if "autograd kernel was not registered" in str(w.message)]
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
