"""`qilin-lite plan`: from a recipe to a plan, printed as a table for people or JSON for machines.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from ..train.stages import MODES
from .settings import Settings, settings_from_recipe
from .shapes import GiB, Shape, count_parameters
from .source import base_of, recipe_config
from .verdict import Plan, make_plan


def parse_memory(text: str) -> float:
    """'24GiB', '24GB', '24G', '24' -> 24.0 (GiB); '512MiB' -> 0.5. A GPU's "GB" are GiB (an 80 GB A100 holds 80 GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise UserError(f"GPU memory '{text}' is not a size; write e.g. 24GiB or 80GB")
    value, unit = float(m.group(1)), (m.group(2) or "gib").lower()
    return value / 1024 if unit.startswith("m") else value


def plan_recipe(
    recipe: str | Path,
    overrides: list[str] | None = None,
    *,
    gpus: int = 1,
    gpu_memory: str | float = "80GiB",
    batch: int | None = None,
    max_length: int | None = None,
    mode: str | None = None,
    dtype: str | None = None,
    device: str = "cuda",
    images: int = 1,
    source: str | None = None,
    image_size: str | None = None,
) -> Plan:
    """A recipe file (+ `section.key=value` overrides) and the run's shape -> `Plan`."""
    from ..config import load_recipe
    from ..families import get_template

    if mode is not None and mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, not '{mode}'")
    fields_ = {"data.max_length": max_length, "train.mode": mode, "model.dtype": dtype, "model.from_run": source}
    r = load_recipe(recipe, overrides, **{k: v for k, v in fields_.items() if v is not None})
    if mode is not None and r.stage in ("align", "tune"):  # prefer / reinforce keep their stage with any mode
        r.stage = "align" if mode == "align" else "tune"
    memory = gpu_memory if isinstance(gpu_memory, (int, float)) else parse_memory(gpu_memory)
    t = get_template(r.template)
    if images > 1 and not t.separate_images:
        raise UserError(f"--images {images}: the '{r.template}' template joins several images into one composite, "
                        "one image's tokens; plan several for a template that keeps them separate (huatuo, chatml)")
    if images > t.max_images:
        raise UserError(f"--images {images}: the '{r.template}' template takes at most {t.max_images}")
    s = settings_from_recipe(r, gpus=gpus, gpu_memory_gib=memory, per_device_batch=batch, device=device,
                             images=images)
    _ = s.accumulation  # a batch that does not divide the global batch is the user's to fix, before anything else
    return make_plan(recipe_shape(r, image_size), s, str(recipe))


def recipe_shape(r, image_size: str | None = None) -> Shape:
    """The recipe's model as the planner's `Shape`; a model in its own class (Qwen2.5-VL, Gemma 3) with the image
    tokens `image_size` becomes by its resize rule (its recipe's pixel bounds)."""
    from ..families import family_of_config
    from .native import image_hw, native_shape, release_pixels

    config = recipe_config(r)
    hw = image_hw(image_size)
    family = family_of_config(config)
    if hw is not None and family.image_mode != "native":
        raise UserError(f"--image-size: every image of the {r.template} template is resized to the tower's "
                        f"{config.vision_config.image_size} px; the flag sizes native-resolution models (Qwen2.5-VL)")
    if config.model_type == "llava":
        return count_parameters(config)
    lo, hi = release_pixels(base_of(r))  # the recipe's bounds where it sets them, else the model's own
    pixels = (r.data.min_pixels or lo, r.data.max_pixels or hi)
    shape, how = native_shape(config, family, hw, pixels)
    return replace(shape, image_note=how)


def _images(s: Settings, shape: Shape) -> str:
    n = f"{shape.image_tokens} image" if s.images == 1 else f"{s.images} images x {shape.image_tokens}"
    return n + (f" tokens: {shape.image_note}" if shape.image_note else "")


def _gib(n: int) -> float:
    return round(n / GiB, 2)


def _describe(s: Settings, shape: Shape) -> list[str]:
    ds = f"DeepSpeed ZeRO-{s.zero_stage}" if s.zero_stage else "no DeepSpeed"
    if s.fsdp:
        ds = f"FSDP {'full_shard' if s.zero_stage == 3 else 'shard_grad_op'} (planned as ZeRO-{s.zero_stage})"
    attn = s.planned_attention
    return [
        f"mode {s.mode} | {s.gpus} GPU{'s' if s.gpus > 1 else ''} x {s.gpu_memory_gib:g} GiB | batch {s.per_device_batch} x "
        f"accumulation {s.accumulation} x {s.gpus} = {s.global_batch} | {s.max_length} positions ({_images(s, shape)})",
        f"checkpointing {'on' if s.gradient_checkpointing else 'off'} | {ds} | attention {attn} | {s.dtype}"
        f"{' + autocast' if s.mixed_precision and not s.zero_stage else ''} | {s.device}",
    ]


def _param_rows(p: Plan) -> list[tuple[str, int, str]]:
    s, sh = p.settings, p.shape
    decoder = {4: "NF4 (4-bit)", 8: "int8"}.get(s.bits, "frozen")
    trained_llm = s.mode == "full"
    rows = [
        ("vision tower", sh.vision, "frozen"),
        ("projector", sh.projector, "trained" + (" (copy beside the frozen original)" if s.mode in ("lora", "qlora") else "")),
        ("LLM decoder linear", sh.decoder_linear, "trained" if trained_llm else decoder),
        ("LLM decoder norms", sh.decoder_other, "trained" if trained_llm else "frozen"),
        ("LLM embeddings", sh.embeddings, "trained" if trained_llm else "frozen"),
        ("LLM final norm", sh.final_norm, "trained" if trained_llm else "frozen"),
        ("lm_head", sh.lm_head, "trained" if trained_llm else "frozen"),
    ]
    if s.mode in ("lora", "qlora"):
        rows.append((f"LoRA adapters (r={s.lora_r})", sh.lora_params(s.lora_r),
                     f"trained, on {len(sh.linears) // sh.layers} linear layers x {sh.layers}"))
    return rows


def format_plan(p: Plan) -> str:
    est, s = p.estimate, p.settings
    out = [f"qilin-lite plan {p.recipe}".rstrip()] + ["  " + line for line in _describe(s, p.shape)]
    out.append("  precision: " + ", ".join(f"{k} {v}" for k, v in est.dtypes.items()))
    out += ["", f"{'parameters':34} {'millions':>10}"]
    for name, n, what in _param_rows(p):
        out.append(f"  {name:32} {n / 1e6:10.1f}  {what}")
    out.append(f"  {'total':32} {p.shape.total / 1e6:10.1f}  (trained {est.trainable / 1e6:.1f})")
    out += ["", f"{'per-GPU memory at the peak (' + est.peak_phase + ')':50} {'GiB':>8}"]
    for name, n in est.components.items():
        if n:
            out.append(f"  {name:48} {n / GiB:8.2f}")
    out.append(f"  {'total':48} {est.total / GiB:8.2f}  of {s.gpu_memory_gib:g}")
    out.append(f"activations saved for backward: {est.activations_checkpointed / GiB:.2f} GiB with checkpointing, "
               f"{est.activations_full / GiB:.2f} GiB without")
    out += [f"note: {n}" for n in est.notes]
    if p.fits:
        out.append(f"verdict: fits, {(p.capacity - est.total) / GiB:.2f} GiB to spare")
    else:
        out.append(f"verdict: does not fit ({est.total / GiB:.2f} GiB needed, {s.gpu_memory_gib:g} GiB per GPU)")
        sug = p.suggestion
        if sug is None:
            out.append("no change tried fits (batch, checkpointing, ZeRO-3, 4-bit, up to 64 GPUs); shorten --max-length")
        else:
            out.append(f"smallest change that fits: {sug.change} -> {sug.estimate.total / GiB:.2f} GiB")
            out.append(f"  train with: {' '.join(f for f in sug.flags if not f.startswith('--gpus'))}"
                       + (f"  on {sug.settings.gpus} GPUs (accelerate launch --num_processes {sug.settings.gpus})"
                          if sug.settings.gpus != s.gpus else ""))
            out.append(f"  check with: qilin-lite plan {p.recipe} {' '.join(_plan_args(sug.settings, sug.flags))}")
    return "\n".join(out)


def _plan_args(s: Settings, flags: list[str]) -> list[str]:
    args = [f"--gpus {s.gpus}", f"--gpu-memory {s.gpu_memory_gib:g}GiB", f"--mode {s.mode}"]
    args += [f for f in flags if f.startswith("--set")]
    if s.load_4bit:
        args.append("--set model.load_4bit=true")
    if s.images > 1:
        args.append(f"--images {s.images}")
    return args


def plan_to_dict(p: Plan) -> dict:
    est, s = p.estimate, p.settings
    d = {
        "recipe": p.recipe,
        "settings": {**asdict(s), "accumulation": s.accumulation},
        "parameters": {**p.shape.groups(), "lora_adapters": p.shape.lora_params(s.lora_r) if s.mode in ("lora", "qlora") else 0,
                       "total": p.shape.total, "trained": est.trainable},
        "memory_gib": {k: _gib(v) for k, v in est.components.items()},
        "total_gib": _gib(est.total),
        "capacity_gib": s.gpu_memory_gib,
        "fits": p.fits,
        "peak_phase": est.peak_phase,
        "phases_gib": {k: _gib(v) for k, v in est.phases.items()},
        "activations_gib": {"checkpointing": _gib(est.activations_checkpointed), "no_checkpointing": _gib(est.activations_full)},
        "dtypes": est.dtypes,
        "notes": est.notes,
        "suggestion": None,
    }
    if p.suggestion:
        sug = p.suggestion
        d["suggestion"] = {"change": sug.change, "flags": sug.flags, "total_gib": _gib(sug.estimate.total),
                           "plan_command": f"qilin-lite plan {p.recipe} {' '.join(_plan_args(sug.settings, sug.flags))}",
                           "settings": {**asdict(sug.settings), "accumulation": sug.settings.accumulation}}
    return d


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan_command(
        recipe: Annotated[Path, typer.Argument(help="recipe YAML (see recipes/)")],
        gpus: Annotated[int, typer.Option("--gpus", help="GPUs the run is launched on")] = 1,
        gpu_memory: Annotated[str, typer.Option("--gpu-memory", help="memory per GPU: 24GiB, 80GB (a GPU's GB are GiB)")] = "80GiB",
        batch: Annotated[Optional[int], typer.Option("--batch", help="per-device batch (default: the recipe's)")] = None,
        max_length: Annotated[Optional[int], typer.Option("--max-length", help="the recipe's cut: text ids with an image as one (length_mode text, planned as + image tokens - 1 positions) or positions (total)")] = None,
        mode: Annotated[Optional[str], typer.Option("--mode", help="align | lora | qlora | full (default: the recipe's)")] = None,
        dtype: Annotated[Optional[str], typer.Option("--dtype", help="weights' dtype: bfloat16 | float16 | float32")] = None,
        images: Annotated[int, typer.Option("--images", help="images per sample to plan for (templates that keep images separate: huatuo, chatml)")] = 1,
        source: Annotated[Optional[str], typer.Option("--from", help="the model the run starts from, as tune takes it: an align run, a model directory or a hub id (google/medgemma-4b-it; the planner knows the common ones without a download)")] = None,
        image_size: Annotated[Optional[str], typer.Option("--image-size", help="native-resolution models: the image to plan for, 1024 or WIDTHxHEIGHT (default: the largest data.max_pixels lets through)")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="override any recipe field: section.key=value")] = None,
    ):
        """Estimate per-GPU memory for a recipe; say whether it fits and, if not, the smallest change that does.

        Exit status: 0 fits, 1 does not fit, 2 a bad recipe or flag.
        """
        p = plan_recipe(recipe, set_, gpus=gpus, gpu_memory=gpu_memory, batch=batch, max_length=max_length, mode=mode,
                        dtype=dtype, images=images, source=source, image_size=image_size)
        typer.echo(json.dumps(plan_to_dict(p), indent=2, ensure_ascii=False) if as_json else format_plan(p))
        raise typer.Exit(0 if p.fits else 1)
