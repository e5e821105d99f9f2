"""Model families, one module each (llava.py: the paper's; huatuo.py: HuatuoGPT-Vision; chatml.py: Qwen2 chat LLMs
behind a Llava tower; qwen_vl.py: Qwen2.5-VL; qwen3_vl.py: Qwen3-VL; gemma3.py: Gemma 3 / MedGemma), on the contract
in base.py. This module lists them and finds the one a checkpoint belongs to.

Add a family: a module with its `Template` subclass(es) and a `Family`, listed in FAMILIES below, and its tests
(CONTRIBUTING.md, "Add a model family").
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import (  # noqa: F401 - the package's public names
    COMPOSITE_MAX_IMAGES,
    IGNORE,
    IMAGE_TOKEN,
    MARKER,
    MULTI_IMAGE,
    Family,
    Ollama,
    Rendered,
    Template,
    check_roles,
    image_count,
)
from .chatml import QWEN2_CHAT
from .huatuo import HUATUO_VISION
from .llava import LLAVA, VICUNA_SYSTEM, VICUNA_V1  # noqa: F401
from .gemma3 import GEMMA3
from .qwen_vl import QWEN2_5_VL
from .qwen3_vl import QWEN3_VL

# Asked in this order which template an unknown checkpoint speaks; the paper's LLaVA, last, takes any the others
# leave (HuatuoGPT-Vision is a Qwen2 LLM too, so it is asked before the ChatML family; the native Qwen-VL models
# are Qwen2 LLMs inside, and HuatuoGPT-Vision-7B-Qwen2.5VL one of them, so they are asked first; Qwen2.5-VL and
# Qwen3-VL claim only their own config model_type, so between them the order does not matter).
FAMILIES: tuple[Family, ...] = (QWEN2_5_VL, QWEN3_VL, GEMMA3, HUATUO_VISION, QWEN2_CHAT, LLAVA)
TEMPLATES: dict[str, Template] = {t.name: t for f in FAMILIES[::-1] for t in f.templates}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        from ..errors import UserError

        raise UserError(f"unknown template '{name}'; choose one of: {', '.join(TEMPLATES)}") from None


def family_of(template: Template) -> Family:
    return next(f for f in FAMILIES if template in f.templates)


def family_of_config(config) -> Family:
    """The family whose transformers class a config (a loaded one, or config.json's dict) is; every Llava-built
    family shares LLaVA's class and parts."""
    kind = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return next((f for f in FAMILIES if kind in f.model_types), LLAVA)


def guess_template(source: str) -> str:
    """The chat template of a Llava directory or hub id that qilin-lite did not write (no qilin.json): the first
    family that claims it (its name, its config.json), else LLaVA's vicuna_v1."""
    try:
        from transformers.utils import cached_file

        f = cached_file(source, "config.json", _raise_exceptions_for_missing_entries=False)
        config = json.loads(Path(f).read_text(encoding="utf-8")) if f else {}
    except (OSError, ValueError):
        config = {}
    return next(t for t in (f.template_for(str(source), config) for f in FAMILIES) if t)


# The conversation steps as functions of (messages, template), for callers that hold a template name's object.
def render(messages: list[dict], template: Template, *, add_generation_prompt: bool = False, eos: str = "") -> Rendered:
    return template.render(messages, add_generation_prompt=add_generation_prompt, eos=eos)


def place_image(messages: list[dict], template: Template) -> list[dict]:
    return template.place_images(messages)


def chat_template_jinja(template: Template) -> str:
    return template.chat_template_jinja()


def typed_text(text: str, template: Template | None = None) -> str:
    """What a person typed, as text only (see `Template.typed_text`); no template: the generic rule."""
    return (template or VICUNA_V1).typed_text(text)
