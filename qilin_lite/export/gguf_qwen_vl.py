"""Qwen2.5-VL and Qwen3-VL as llama.cpp runs them: the LLM as llama.cpp's `qwen2vl` (Qwen2's tensors, M-RoPE's
sections) or `qwen3vl` (Qwen3's, q/k norms, interleaved M-RoPE, DeepStack's layer count) architecture, and the vision
tower + patch merger as an mmproj of projector type `qwen2.5vl_merger` or `qwen3vl_merger` (with DeepStack's
mergers), names from the `gguf` package's own tensor map (the table llama.cpp's converter uses), written with
gguf.py's streaming writer.

What llama.cpp fixes that the checkpoint may not: window attention over 112 px windows (its graph does not read
the config's `window_size`), a 2 x 2 patch merger, two frames per patch. A checkpoint that differs is refused in one
line rather than exported to answer differently. Images: llama.cpp resizes as Qwen's `smart_resize` does, but
between its own token limits (8 to 4,096 for Qwen2.5-VL), not the processor's; the run's limits are given to it as
`--image-min-tokens` / `--image-max-tokens` (`image_token_limits`), which the export's README and the command line
print.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from .gguf import LLM_NAMES, Weights, vision_kv, write_gguf, write_llm
from .templates import NOTICE

PREFIXES = {  # the vision tower first: "model." would also match "model.visual."
    "vision": ("model.visual.", "visual."),
    "head": ("lm_head.",),
    "llm": ("model.language_model.", "model."),
}
LLAMA_CPP_WINDOW = 112  # px; clip.cpp's Qwen2.5-VL window attention, whatever the config says
PROJECTOR_TYPE = "qwen2.5vl_merger"
QWEN3_NAMES = {"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}


def is_qwen_vl(cfg: dict) -> bool:
    return cfg.get("model_type") in ("qwen2_5_vl", "qwen3_vl")


def _qwen3(cfg: dict) -> bool:
    return cfg.get("model_type") == "qwen3_vl"


def check_exportable(cfg: dict, model_dir: Path) -> None:
    """Refuse, in one line each, what llama.cpp's Qwen-VL graphs would run differently from transformers."""
    if _qwen3(cfg):
        return _check_qwen3(cfg, model_dir)
    v, t = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
    fix = "; llama.cpp's Qwen2.5-VL path cannot run this checkpoint as transformers does"
    if v.get("window_size", LLAMA_CPP_WINDOW) != LLAMA_CPP_WINDOW:
        raise UserError(f"{model_dir}: vision window_size {v['window_size']} px; llama.cpp attends in "
                        f"{LLAMA_CPP_WINDOW} px windows (the released models' size){fix}")
    if v.get("spatial_merge_size", 2) != 2 or v.get("temporal_patch_size", 2) != 2:
        raise UserError(f"{model_dir}: spatial_merge_size {v.get('spatial_merge_size')} / temporal_patch_size "
                        f"{v.get('temporal_patch_size')}; llama.cpp merges 2 x 2 patches of 2 frames{fix}")
    if v.get("hidden_act", "silu") != "silu":
        raise UserError(f"{model_dir}: vision activation '{v.get('hidden_act')}'; llama.cpp's Qwen2.5-VL MLP is "
                        f"SiLU-gated{fix}")
    full = v.get("fullatt_block_indexes") or []
    if not full or any(b - a != full[0] + 1 for a, b in zip(full, full[1:])):
        raise UserError(f"{model_dir}: fullatt_block_indexes {full}; llama.cpp needs full attention every n-th "
                        f"block (as the releases: 7, 15, 23, 31){fix}")
    if v.get("intermediate_size") == v.get("hidden_size"):
        raise UserError(f"{model_dir}: a vision MLP that keeps its width is read by llama.cpp as one with up and "
                        f"down swapped (its fix for old files){fix}")
    rope = t.get("rope_parameters") or t.get("rope_scaling") or cfg.get("rope_scaling") or {}
    section = rope.get("mrope_section")
    if not section or len(section) != 3 or (rope.get("rope_type") or rope.get("type") or "default") not in (
            "default", "mrope"):
        raise UserError(f"{model_dir}: the LLM's RoPE ({rope}) is not Qwen2.5-VL's three-section M-RoPE{fix}")
    if t.get("use_sliding_window"):
        raise UserError(f"{model_dir}: sliding-window attention is on; llama.cpp's qwen2vl attends globally")


def _check_qwen3(cfg: dict, model_dir: Path) -> None:
    v, t = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
    fix = "; llama.cpp's Qwen3-VL path cannot run this checkpoint as transformers does"
    if v.get("spatial_merge_size", 2) != 2 or v.get("temporal_patch_size", 2) != 2:
        raise UserError(f"{model_dir}: spatial_merge_size {v.get('spatial_merge_size')} / temporal_patch_size "
                        f"{v.get('temporal_patch_size')}; llama.cpp merges 2 x 2 patches of 2 frames{fix}")
    if v.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise UserError(f"{model_dir}: vision activation '{v.get('hidden_act')}'; llama.cpp's Qwen3-VL MLP is the "
                        f"tanh GELU{fix}")
    n = int(v.get("num_position_embeddings", 0) ** 0.5)
    if n * n != v.get("num_position_embeddings"):
        raise UserError(f"{model_dir}: num_position_embeddings {v.get('num_position_embeddings')} is not a square "
                        f"grid{fix}")
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    if len(rope.get("mrope_section") or ()) != 3 or not rope.get("mrope_interleaved", True):
        raise UserError(f"{model_dir}: the LLM's RoPE ({rope}) is not Qwen3-VL's interleaved M-RoPE{fix}")
    if t.get("attention_bias"):
        raise UserError(f"{model_dir}: attention biases in the LLM; llama.cpp's qwen3vl has none{fix}")


def image_token_limits(image_processor) -> tuple[int, int]:
    """The processor's (min_pixels, max_pixels) in llama.cpp's unit, merged tokens (28 x 28 px for Qwen2.5-VL, 32 x 32
    for Qwen3-VL): what
    `--image-min-tokens` / `--image-max-tokens` take so that llama.cpp resizes every image to training's grid."""
    unit = (image_processor.patch_size * image_processor.merge_size) ** 2
    size = getattr(image_processor, "size", None) or {}
    lo = size.get("shortest_edge", getattr(image_processor, "min_pixels", None))
    hi = size.get("longest_edge", getattr(image_processor, "max_pixels", None))
    if lo is None or hi is None:
        raise UserError("the run's image processor states no min/max pixels; export needs them for llama.cpp")
    if lo % unit or hi % unit:  # llama.cpp takes whole tokens: a bound between two would resize some images apart
        raise UserError(f"the run's min/max pixels ({lo}, {hi}) are not whole multiples of {unit} (one merged token); "
                        f"llama.cpp's bounds are in tokens: train with data.min_pixels / data.max_pixels that are")
    return lo // unit, hi // unit


def write_llm_qwen_vl(path: Path, model_dir: Path, cfg: dict, weights: Weights, tok, template, name: str) -> None:
    t = cfg["text_config"]
    rope = t.get("rope_parameters") or t.get("rope_scaling") or cfg.get("rope_scaling") or {}
    text_cfg = {**cfg, "text_config": {**t, "rope_parameters": {**rope, "rope_theta": rope.get(
        "rope_theta", t.get("rope_theta", 1000000.0))}}}

    qwen3 = _qwen3(cfg)

    def extra(w):  # M-RoPE: rotary half-dimensions for (time, height, width), padded to llama.cpp's four
        w.add_rope_dimension_sections([int(x) for x in rope["mrope_section"]] + [0])
        if qwen3:  # how many LLM layers take a DeepStack feature (the mmproj's embeddings carry them after the main)
            w.add_num_deepstack_layers(len(cfg["vision_config"].get("deepstack_visual_indexes") or ()))

    layer_names = {**LLM_NAMES, **QWEN3_NAMES} if qwen3 else LLM_NAMES
    for key in layer_names:  # an incomplete directory is one line, before the writer opens the file
        if key not in ("embed_tokens.weight", "norm.weight") and not weights.has(f"llm:layers.0.{key}"):
            raise UserError(f"{model_dir}: LLM tensor 'layers.0.{key}' missing; the weights are incomplete")
    write_llm(path, model_dir, text_cfg, weights, tok, template, name, arch="qwen3vl" if qwen3 else "qwen2vl",
              extra_kv=extra, layer_names=QWEN3_NAMES if qwen3 else None)


def write_mmproj_qwen_vl(path: Path, model_dir: Path, cfg: dict, weights: Weights, image_processor,
                         name: str) -> None:
    import gguf

    if _qwen3(cfg):
        return _write_mmproj_qwen3(path, model_dir, cfg, weights, image_processor, name)
    v = cfg["vision_config"]
    depth = int(v["depth"])
    lo, hi = image_token_limits(image_processor)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(depth, 3))

    def kv(w):
        w.add_name(f"mmproj-{name}")
        w.add_description(
            f"Qwen2.5-VL vision tower ({depth} blocks) + patch merger, exported by qilin-lite. Trained on images "
            f"resized to {lo}-{hi} tokens of 28 x 28 px: run llama.cpp with --image-min-tokens {lo} "
            f"--image-max-tokens {hi}. {NOTICE}")
        # the image size is llama.cpp's warm-up image only: Qwen sees images at their own size
        vision_kv(w, PROJECTOR_TYPE, cfg, image_processor, image_size=560, depth=depth, heads=int(v["num_heads"]))
        w.add_vision_use_silu(True)
        w.add_vision_n_wa_pattern(int(v["fullatt_block_indexes"][0]) + 1)
        w.add_vision_spatial_merge_size(int(v.get("spatial_merge_size", 2)))
        w.add_vision_attention_layernorm_eps(1e-6)  # transformers' Qwen2.5-VL vision RMSNorm eps
        w.add_uint32("qilin.image_min_tokens", lo)
        w.add_uint32("qilin.image_max_tokens", hi)

    def part(key, k, n):  # one third of the fused qkv (rows: q, then k, then v)
        return lambda: np.split(weights.get(key), n, axis=0)[k]

    def need(key):
        return _need(weights, model_dir, key)

    tensors = _patch_frames(weights, model_dir)
    for i in range(depth):
        for src in ("norm1", "norm2", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            dst = names.get_name(f"visual.blocks.{i}.{src}")
            for kind in ("weight", "bias"):
                key = f"vision:blocks.{i}.{src}.{kind}"
                if kind == "weight" or weights.has(key):  # RMSNorms have no bias
                    tensors.append((f"{dst}.{kind}", weights.shapes[need(key)], _lazy(weights, key)))
        for kind in ("weight", "bias"):
            key = need(f"vision:blocks.{i}.attn.qkv.{kind}")
            rows = weights.shapes[key]
            for k, qkv in enumerate("qkv"):
                dst = names.get_name(f"visual.blocks.{i}.attn.{qkv}")
                tensors.append((f"{dst}.{kind}", (rows[0] // 3, *rows[1:]), part(key, k, 3)))
    tensors.append((names.get_name("visual.merger.ln_q") + ".weight",
                    weights.shapes[need("vision:merger.ln_q.weight")], _lazy(weights, "vision:merger.ln_q.weight")))
    for idx in (0, 2):
        for kind in ("weight", "bias"):
            key = need(f"vision:merger.mlp.{idx}.{kind}")
            tensors.append((f"{names.get_name(f'visual.merger.mlp.{idx}')}.{kind}", weights.shapes[key],
                            _lazy(weights, key)))
    write_gguf(path, "clip", kv, tensors)


def _need(weights: Weights, model_dir: Path, key: str) -> str:
    if not weights.has(key):
        raise UserError(f"{model_dir}: vision tensor '{key.split(':', 1)[1]}' missing; the weights are incomplete "
                        "or not a Qwen-VL's")
    return key


def _lazy(weights: Weights, key: str):
    """The tensor, read when the writer reaches it."""
    return lambda: weights.get(key)


def _patch_frames(weights: Weights, model_dir: Path) -> list:
    """The patch embedding's Conv3d over two frames as llama.cpp's two Conv2d kernels (both Qwen-VL towers)."""
    import gguf

    patch = _need(weights, model_dir, "vision:patch_embed.proj.weight")
    shape = weights.shapes[patch]
    base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH] + ".weight"
    return [(base + tail, shape[:2] + shape[3:], (lambda k: lambda: weights.get(patch)[:, :, k])(k))
            for k, tail in enumerate(("", ".1"))]


def _write_mmproj_qwen3(path: Path, model_dir: Path, cfg: dict, weights: Weights, image_processor,
                        name: str) -> None:
    """Qwen3-VL's tower: LayerNorms with biases, fused qkv kept fused (llama.cpp reads attn_qkv), learned position
    embeddings on a square grid (llama.cpp interpolates them bilinearly with aligned corners, as transformers does),
    DeepStack's mergers under the vision layer each follows."""
    import gguf

    v = cfg["vision_config"]
    depth, stack = int(v["depth"]), list(v.get("deepstack_visual_indexes") or ())
    lo, hi = image_token_limits(image_processor)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(depth, 3))

    def kv(w):
        w.add_name(f"mmproj-{name}")
        w.add_description(
            f"Qwen3-VL vision tower ({depth} blocks, DeepStack after {stack}) + patch merger, exported by qilin-lite. "
            f"Trained on images resized to {lo}-{hi} tokens of 32 x 32 px: run llama.cpp with --image-min-tokens {lo} "
            f"--image-max-tokens {hi}. {NOTICE}")
        vision_kv(w, gguf.VisionProjectorType.QWEN3VL, cfg, image_processor, depth=depth, heads=int(v["num_heads"]),
                  image_size=int(int(v["num_position_embeddings"]) ** 0.5) * int(v["patch_size"]))
        w.add_vision_use_gelu(True)
        w.add_vision_spatial_merge_size(int(v.get("spatial_merge_size", 2)))
        w.add_vision_attention_layernorm_eps(1e-6)  # transformers' Qwen3-VL vision LayerNorm eps
        w.add_vision_is_deepstack_layers([i in stack for i in range(depth)])
        w.add_uint32("qilin.image_min_tokens", lo)
        w.add_uint32("qilin.image_max_tokens", hi)

    def both(src: str, dst: str) -> list:
        return [(f"{dst}.{kind}", weights.shapes[_need(weights, model_dir, f"vision:{src}.{kind}")],
                 _lazy(weights, f"vision:{src}.{kind}")) for kind in ("weight", "bias")]

    tensors = _patch_frames(weights, model_dir)
    for src, dst in (("patch_embed.proj.bias", gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH] + ".bias"),
                     ("pos_embed.weight", names.get_name("visual.pos_embed") + ".weight")):
        tensors.append((dst, weights.shapes[_need(weights, model_dir, f"vision:{src}")], _lazy(weights, f"vision:{src}")))
    for i in range(depth):
        for src in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"):
            tensors += both(f"blocks.{i}.{src}", names.get_name(f"visual.blocks.{i}.{src}"))
    tensors += both("merger.norm", gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_POST_NORM])
    tensors += both("merger.linear_fc1", "mm.0") + both("merger.linear_fc2", "mm.2")
    for k, layer in enumerate(stack):  # the k-th DeepStack merger follows vision layer `layer`
        for src, kind in (("norm", gguf.MODEL_TENSOR.V_DS_NORM), ("linear_fc1", gguf.MODEL_TENSOR.V_DS_FC1),
                          ("linear_fc2", gguf.MODEL_TENSOR.V_DS_FC2)):
            tensors += both(f"deepstack_merger_list.{k}.{src}", gguf.TENSOR_NAMES[kind].format(bid=layer))
    write_gguf(path, "clip", kv, tensors)


def readme(model: str, mmproj: str, name: str, limits: tuple[int, int], cfg: dict) -> str:
    lo, hi = limits
    kind, px = ("Qwen3-VL", 32) if _qwen3(cfg) else ("Qwen2.5-VL", 28)
    flags = f"--image-min-tokens {lo} --image-max-tokens {hi}"
    return f"""# {name}: GGUF export (qilin-lite)

> {NOTICE}

Run on a CPU with llama.cpp (a build with {kind} support, 2025 or later):

    llama-mtmd-cli -m {model} --mmproj {mmproj} --jinja {flags} --image scan.png -p "这张图像显示了什么？" --temp 0
    llama-server -m {model} --mmproj {mmproj} --jinja {flags} --host 127.0.0.1

`{flags}`: the run trained on images resized to between {lo} and {hi} tokens of {px} x {px} px; llama.cpp's own
limits for {kind} are 8 to 4,096, so without the flags it resizes images to other grids than training's.
`--jinja` makes llama.cpp use the chat template inside {model} (the run's own: each image where it stands, the
text around it stripped as in training). Send each image as `qilin-lite image scan.dcm --model RUN --out scan.png`
writes it: at the processor's grid (llama.cpp keeps an image's aspect and pads it with black where the processor
stretches it), DICOM and 16-bit images windowed as in training.
Ollama: not written for {kind} (Ollama runs it on its own engine, imported from safetensors: point its
Modelfile's FROM at a `qilin-lite merge` directory).
{model} is {'f16' if model.endswith('-f16.gguf') else 'quantized'}; the mmproj is f16.
"""
