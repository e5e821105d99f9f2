"""convert: a tiny checkpoint written in the original LLaVA layout (the Qilin-Med-VL release format) converts into a
Llava directory whose logits equal a hand computation from the source tensors (CLIP layer -2 patch features ->
projector -> LLaMA on spliced embeddings); pickles need --allow-pickle; the private vision path must be overridden;
chat runs the converted model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from safetensors.torch import load_file, save_file

from qilin_lite.convert import convert_checkpoint
from qilin_lite.errors import UserError

PRIVATE_TOWER = "/mnt/private/qilin/clip-vit-large-patch14-336"  # what the release's config names




def write_llava_checkpoint(tiny_parts, out: Path, *, projector: str = "mlp2x_gelu", pickle: bool = False) -> dict:
    """The tiny LLM + a random projector saved as LLaVA's own code saves a model, in two shards; returns the tensors."""
    vision_dir, llm_dir = tiny_parts
    out.mkdir(parents=True)
    cfg = json.loads((Path(llm_dir) / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.pop("dtype")
    cfg.update({  # a transformers-4.31-era LLaVA config, as in the Qilin-Med-VL release
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "rope_theta": 10000.0,
        "rope_scaling": None, "torch_dtype": "float32", "mm_vision_tower": PRIVATE_TOWER, "mm_hidden_size": 64,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_projector_type": projector,
        "tune_mm_mlp_adapter": False, "use_mm_proj": True, "tokenizer_padding_side": "right",
    })
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(llm_dir) / name, out / name)
    state = load_file(str(Path(llm_dir) / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    if projector == "mlp2x_gelu":
        for layer in ("0", "2"):
            state[f"model.mm_projector.{layer}.weight"] = torch.randn(64, 64, generator=g) * 0.2
            state[f"model.mm_projector.{layer}.bias"] = torch.randn(64, generator=g) * 0.2
    else:
        state["model.mm_projector.weight"] = torch.randn(64, 64, generator=g) * 0.2
        state["model.mm_projector.bias"] = torch.randn(64, generator=g) * 0.2
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old transformers saved this buffer
    names = sorted(state)
    shards = {1: names[: len(names) // 2], 2: names[len(names) // 2:]}
    weight_map = {}
    for i, part in shards.items():
        fname = f"pytorch_model-0000{i}-of-00002.bin" if pickle else f"model-0000{i}-of-00002.safetensors"
        tensors = {k: state[k].contiguous() for k in part}
        torch.save(tensors, out / fname) if pickle else save_file(tensors, str(out / fname))
        weight_map.update({k: fname for k in part})
    index = "pytorch_model.bin.index.json" if pickle else "model.safetensors.index.json"
    (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


@torch.no_grad()
def reference_logits(state: dict, tiny_parts, input_ids: torch.Tensor, image_token_id: int, pixel_values):
    """LLaVA's forward, by hand, from the source tensors: CLIP hidden state -2 without CLS -> projector -> spliced
    into the LLaMA input embeddings where the image placeholders are -> LLaMA."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    vision_dir, llm_dir = tiny_parts
    clip = CLIPVisionModel.from_pretrained(vision_dir, dtype=torch.float32).eval()
    llama = LlamaForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    llama.load_state_dict({k: v for k, v in state.items() if k.startswith(("model.embed_tokens", "model.layers",
                           "model.norm", "lm_head")) and not k.endswith("inv_freq")})
    patches = clip(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    if "model.mm_projector.0.weight" in state:
        hidden = F.gelu(F.linear(patches, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"]))
        features = F.linear(hidden, state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])
    else:
        features = F.linear(patches, state["model.mm_projector.weight"], state["model.mm_projector.bias"])
    is_image = input_ids == image_token_id
    embeds = llama.model.embed_tokens(torch.where(is_image, 0, input_ids))
    embeds[is_image] = features.reshape(-1, features.shape[-1])
    return llama(inputs_embeds=embeds).logits


def converted_inputs(dst: Path, image: Path):
    from transformers import AutoProcessor, AutoTokenizer, LlavaConfig

    from qilin_lite.families import get_template
    from qilin_lite.serve.generate import Generator
    from qilin_lite.model import token_layout
    from qilin_lite.images.pixel_values import ImageLoader

    tok = AutoTokenizer.from_pretrained(dst)
    config = LlavaConfig.from_pretrained(dst)
    prompt = Generator(None, tok, None, get_template("vicuna_v1"), token_layout(config, 10**9))
    ids = torch.from_numpy(prompt.prompt_ids([{"role": "user", "content": "<image>\n病灶位于哪一侧？"}]))[None]
    pixels = ImageLoader(AutoProcessor.from_pretrained(dst).image_processor, "pad")([image])
    return ids, pixels, config


@pytest.mark.parametrize("projector,pickle", [("mlp2x_gelu", False), ("linear", True)])
def test_converted_logits_equal_the_source_computation(projector, pickle, tiny_parts, tiny_data, tmp_path, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    from qilin_lite.model import RunInfo

    src, dst = tmp_path / "Qilin-Med-VL-Chat", tmp_path / "converted"
    state = write_llava_checkpoint(tiny_parts, src, projector=projector, pickle=pickle)
    args = ["convert", str(src), str(dst), "--vision-tower", str(tiny_parts[0])]
    args += ["--allow-pickle"] if pickle else []
    assert run_cli(args, monkeypatch) == 0

    info = RunInfo.load(dst)
    assert (info.template, info.image_mode) == ("vicuna_v1", "pad")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # one output shard per source shard, plus the vision tower

    image = sorted(Path(tiny_data["images"]).glob("img_*.png"))[0]
    ids, pixels, config = converted_inputs(dst, image)
    vocab = state["lm_head.weight"].shape[0]
    assert config.image_token_id == vocab  # "<image>" appended after the source vocabulary
    assert int((ids == config.image_token_id).sum()) == 16  # (32 / 8) ** 2 patches, CLS dropped

    model, loading = LlavaForConditionalGeneration.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"]
    assert model.generation_config.suppress_tokens == [config.image_token_id]
    with torch.no_grad():
        got = model.eval()(input_ids=ids, pixel_values=pixels).logits
    want = reference_logits(state, tiny_parts, ids, config.image_token_id, pixels)
    assert got.shape[-1] == vocab + 1
    assert (got[..., :vocab] - want).abs().max().item() < 1e-5
    assert torch.all(got[..., vocab] == 0)  # the placeholder's output row is zero (and suppressed in generation)


def test_chat_runs_the_converted_model(tiny_parts, tiny_data, tmp_path):
    from qilin_lite.serve.chat_session import ChatSession

    src, dst = tmp_path / "src", tmp_path / "converted"
    write_llava_checkpoint(tiny_parts, src)
    convert_checkpoint(src, dst, vision_tower=str(tiny_parts[0]))
    session = ChatSession.load(str(dst), temperature=0, max_new_tokens=6)
    session.load_image(sorted(Path(tiny_data["images"]).glob("img_*.png"))[0])
    assert session.template.name == "vicuna_v1" and session.generator.images.mode == "pad"
    session.ask("病灶位于哪一侧？")
    assert session.last.tokens > 0 and "<image>" not in session.last.text


def test_refusals(tiny_parts, tmp_path, monkeypatch, capfd):
    src = tmp_path / "src"
    write_llava_checkpoint(tiny_parts, src, pickle=True)
    capfd.readouterr()
    assert run_cli(["convert", str(src), str(tmp_path / "a"), "--vision-tower", str(tiny_parts[0])], monkeypatch) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-pickle" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "a").exists()

    with pytest.raises(UserError, match="is a path that is not here; pass --vision-tower"):
        convert_checkpoint(src, tmp_path / "b", allow_pickle=True)  # the release's private mm_vision_tower path
    with pytest.raises(UserError, match="already a transformers Llava directory"):
        (tmp_path / "llava").mkdir()
        (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {}}))
        convert_checkpoint(tmp_path / "llava", tmp_path / "c")

    safe = tmp_path / "safe"
    write_llava_checkpoint(tiny_parts, safe)
    shard = safe / "model-00002-of-00002.safetensors"
    part = load_file(str(shard))
    part.pop(sorted(k for k in part if k.startswith("model.layers"))[0])
    save_file(part, str(shard))
    with pytest.raises(UserError, match="lacks 1 tensor"):
        convert_checkpoint(safe, tmp_path / "d", vision_tower=str(tiny_parts[0]))
    assert not (tmp_path / "d").exists()  # checked before anything is written
