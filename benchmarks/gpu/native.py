"""gpu-check's native-family cases: a Qwen2.5-VL, a Qwen3-VL and a Gemma 3 built from config (tiny on the CPU, a
few hundred MB on a GPU) each train `tune --lora` on records whose images run from 64 to 1024 px (the Qwens at
native resolution; Gemma 3 squashes each to its tower's size), then answer through chat's loader.

What only a GPU shows, recorded: the dtype and attention kernel the run really trained with (bf16 and flash-attention 2
where the machine has them: native resolution makes every sequence a different length), the loss finite, the peak
memory, and the flash-attention logits against sdpa's on the same batch (the M-RoPE positions and the patch
merger's windows under the other kernel).
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def records(root: Path, n: int, sizes: tuple[int, int], seed: int = 0) -> Path:
    from PIL import Image

    rng, rows = random.Random(seed), []
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        side = (rng.randint(*sizes), rng.randint(*sizes))
        Image.new("RGB", side, (rng.randrange(256), 90, 160)).save(root / "img" / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n这张图像显示什么？"}, {"from": "gpt", "value": "双肺纹理清晰，未见异常。"}]})
    (root / "train.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return root / "train.json"


FAMILIES = ("qwen2.5-vl", "qwen3-vl", "gemma3")


def build(family: str, work: Path, toy: bool) -> Path:
    """The family's tiny model: GPU sizes give flash-attention real head widths (64-128) and long image spans."""
    from qilin_lite.demo.gemma3 import build_tiny_gemma3
    from qilin_lite.demo.qwen_vl import build_tiny_qwen2_5_vl, build_tiny_qwen3_vl

    texts = ["这张图像显示什么？", "双肺纹理清晰，未见异常。", "左肺上叶可见结节影。"] * 40
    if family == "gemma3":  # two heads: head_dim = hidden / 2, within flash-attention's 256
        return build_tiny_gemma3(work / family, texts, **({} if toy else {"hidden": 256, "layers": 8,
                                                                          "image_size": 224, "tokens_per_image": 64}))
    size = {"hidden": 64, "layers": 2} if toy else {"hidden": 1024, "layers": 8, "heads": 16}
    if family == "qwen3-vl":
        return build_tiny_qwen3_vl(work / family, texts, **size, **({} if toy else {"max_pixels": 1024 * 1024}))
    return build_tiny_qwen2_5_vl(work / family, texts, **size, **({} if toy else {"max_pixels": 1024 * 1024}))


def native_case(work: Path, toy: bool, family: str = "qwen2.5-vl") -> dict:
    import torch

    from qilin_lite.config import load_recipe
    from qilin_lite.device import cuda
    from qilin_lite.serve.generate import load_generator
    from qilin_lite.train.stage import train_stage

    base = build(family, work, toy)
    data = records(work / "native-data", 8, (64, 256) if toy else (64, 1024))
    on_gpu = cuda()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    recipe = load_recipe(None, None, stage="tune", output_dir=str(work / f"native-run-{family}"), **{
        "model.from_run": str(base), "model.dtype": "bfloat16" if on_gpu else "float32", "model.attn": "auto",
        "train.mode": "lora", "train.max_steps": 2, "train.global_batch": 4, "train.per_device_batch": 4,
        "train.bf16": on_gpu, "train.tf32": False, "train.lr": 1e-3, "train.lora_r": 8, "train.lora_alpha": 16,
        "train.logging_steps": 1, "train.save_steps": 1000, "train.gradient_checkpointing": False,
        "data.train": str(data), "data.image_folder": str(data.parent / "img"), "data.num_workers": 0,
        "data.max_length": 8192, "data.length_mode": "total"})
    out, model = train_stage(recipe)
    summary = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    history = json.loads((out / "log_history.json").read_text(encoding="utf-8"))
    losses = [x["loss"] for x in history if "loss" in x]
    trained = {"dtype": str(next(p for p in model.parameters() if p.requires_grad).dtype).replace("torch.", ""),
               "compute_dtype": str(model.dtype).replace("torch.", ""), "attn": summary["attention"],
               "loss_finite": bool(losses) and all(x == x and abs(x) != float("inf") for x in losses),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None}
    gen, _ = load_generator(str(out), max_new_tokens=8, temperature=0)
    answer = gen.generate([[{"role": "user", "content": "<image>\n这张图像显示什么？"}]],
                          [[data.parent / "img" / "0.png"]])[0]
    agree = kernels_agree(base, data) if on_gpu else None
    ok = trained["loss_finite"] and isinstance(answer, str) and agree in (None, True)
    return {"ok": ok, "family": family, "trained": trained, "answer": answer, "flash_vs_sdpa_logits_agree": agree,
            "steps": summary["steps"]}


def kernels_agree(base: Path, data: Path) -> bool | None:
    """flash-attention 2 and sdpa give the same logits (bf16 tolerance) on one native-resolution batch; None where
    flash-attn is not installed."""
    import importlib.util

    import torch

    if importlib.util.find_spec("flash_attn") is None:
        return None
    import transformers

    from qilin_lite.encoding import encode
    from qilin_lite.images.pixel_values import image_loader
    from qilin_lite.model import RunInfo, load_tokenizer_and_processor, template_of, token_layout
    from qilin_lite.families import family_of, get_template

    tok, ip = load_tokenizer_and_processor(str(base))
    template = get_template(template_of(str(base)))
    family = family_of(template)
    loader = image_loader(ip, family.image_mode)
    img = [loader.open(data.parent / "img" / "1.png")]
    msgs = [{"role": "user", "content": "<image>\n这张图像显示什么？"}, {"role": "assistant", "content": "双肺纹理清晰。"}]
    outs = []
    for attn in ("sdpa", "flash_attention_2"):
        model = getattr(transformers, family.model_class).from_pretrained(
            str(base), dtype=torch.bfloat16, attn_implementation=attn).cuda().eval()
        layout = token_layout(model.config, 8192, "total")
        ids, _ = encode(msgs, template, tok, layout, loader.counts(img))
        ids_t = torch.from_numpy(ids)[None].cuda()
        vision = {k: v.cuda() for k, v in loader.inputs(img).items()}
        vision["pixel_values"] = vision["pixel_values"].to(torch.bfloat16)
        marks = {layout.marks: (ids_t == layout.image_token_id).long()} if layout.marks else {}
        with torch.no_grad():
            outs.append(model(input_ids=ids_t, **marks, **vision).logits.float())
        del model
    return bool(torch.allclose(outs[0], outs[1], atol=5e-2, rtol=5e-2))
