"""What model a recipe trains, as a config: its base, its align run's base, a whole run or a release as it ships
(a Llava, or a model in its own class such as Qwen2.5-VL or Gemma 3), or a vision encoder and an LLM joined as
`assemble_base` does. Nothing is downloaded: a local directory, a hub id in the local cache, or one the planner knows.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .native import KNOWN_NATIVE, native_config
from .shapes import KNOWN_LLM, KNOWN_VISION, llava_config


def _local_config(source: str, what: str) -> dict:
    p = Path(source)
    if (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text(encoding="utf-8"))
    try:  # a hub id already in the local cache
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source, local_files_only=True).to_dict()
    except (OSError, ValueError):
        raise UserError(
            f"{source}: no config for the {what} here and nothing is downloaded; give a local directory "
            f"(the planner knows {', '.join(sorted(_known(what)))} by heart)"
        ) from None


def _known(what: str) -> dict:
    return {"vision encoder": KNOWN_VISION, "LLM": KNOWN_LLM}.get(what, {**KNOWN_NATIVE, **KNOWN_LLM})


def recipe_config(recipe):
    """The config a recipe trains: its base / align run's base (a Llava, or a model in its own class such as
    Qwen2.5-VL), or vision + LLM joined as `assemble_base` does."""
    from transformers import LlavaConfig

    from ..families import family_of, family_of_config, get_template

    family = family_of(get_template(recipe.template))
    base = base_of(recipe)
    native = family.model_class != "LlavaForConditionalGeneration"
    if native and not base:
        raise UserError(f"the {recipe.template} template trains a {family.name} model in its own class: say which with "
                        f"--from (a directory or hub id; the planner knows {', '.join(sorted(KNOWN_NATIVE))})")
    if base:
        cfg = KNOWN_NATIVE.get(base) or _local_config(base, "model")
        kind = cfg.get("model_type")
        if kind == "llava" and not native:
            return LlavaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
        found = family_of_config(cfg)
        if kind == "llava" or found is not family:
            raise UserError(f"{base}: a {kind} model, which this recipe's {recipe.template} template does not train "
                            f"(it trains a {family.model_class}); plan it with a recipe for its family "
                            f"(--set data.template={found.templates[0].name})")
        return native_config(cfg)
    m = recipe.model
    vision = KNOWN_VISION.get(m.vision) or _vision_dict(_local_config(m.vision, "vision encoder"))
    llm = KNOWN_LLM.get(m.llm) or _local_config(m.llm, "LLM")
    return llava_config(vision, llm, m.projector, m.vision_feature_layer)


def base_of(recipe) -> str | None:
    """The model a recipe's run starts from (`model.base`, or `model.from_run`: an align run's base, a whole run or a
    release as it ships); None where align joins a vision encoder and an LLM."""
    from ..model import RunInfo, resolve_base

    m = recipe.model
    base = m.base
    if m.from_run:
        info = RunInfo.load(Path(m.from_run))
        if info is not None and info.kind == "align":
            base = resolve_base(Path(m.from_run), info)
        elif info is not None or _released(m.from_run):
            base = str(m.from_run)  # a whole model: a merged / converted run, or a release tuned as it ships
        else:
            raise UserError(
                f"{m.from_run}: not a qilin-lite run directory (no qilin.json) nor a model; pass --from ALIGN_DIR, "
                "a model directory or a hub id")
    return base


def _released(source: str) -> bool:
    from ..train.stage import released_model

    return released_model(source)


def _vision_dict(cfg: dict) -> dict:
    cfg = cfg.get("vision_config", cfg)  # a full CLIP directory holds the tower's config inside
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
            "projection_dim", "hidden_act", "layer_norm_eps", "num_channels")
    return {k: cfg[k] for k in keep if k in cfg}
