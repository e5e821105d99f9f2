"""Qwen3-VL (Qwen3-VL-2B/4B/8B/32B-Instruct and medical models fine-tuned from them): the native transformers class
`Qwen3VLForConditionalGeneration`, images at native resolution. Template `qwen3-vl`.

As the model's processor prompts it (the Instruct releases' chat template, tests/data/qwen3_vl/) and as QwenLM's own
fine-tuning code trains it (the Qwen3-VL repository's `qwen-vl-finetune`, the same `data_processor.py` for Qwen2.5-VL
and Qwen3-VL), it is Qwen2.5-VL's format (families/qwen_vl.py: image parts where the tags stand, the text between
stripped, `<|im_start|>role\\n...<|im_end|>\\n`, each reply with its `<|im_end|>` and the `\\n` after it supervised)
with one difference in the text: no default system prompt. Qwen2.5-VL's template writes "You are a helpful
assistant." when the first message is not a system message; Qwen3-VL's writes a system turn only when the
conversation has one. What differs besides lives in the model, the processor and the image processor's settings,
not here: 16 px patches (14 in Qwen2.5-VL), so an image token covers 32 x 32 px after the 2 x 2 merge (28 x 28
before); DeepStack (features of some vision layers added to the first LLM layers through their own mergers,
`model.visual.deepstack_merger_list`); interleaved M-RoPE. The 3-D positions still come from the image-token marks
(`mm_token_type_ids`), and without them transformers raises rather than falling back.

Trained as qwen-vl-finetune trains it: its `tune_mm_mlp` is `model.visual.merger` only (the DeepStack mergers stay
with the frozen tower), its LoRA the LLM's q/k/v/o projections.

Not here: the Thinking releases (Qwen3-VL-*-Thinking, the same model_type). Their template opens every generation
with `<think>\\n` and wraps the last reply in `<think>...</think>`; this template would train and prompt them as
Instruct models, so they are refused in one line (by the name, or a chat template that speaks `<think>`) until a
`qwen3-vl-thinking` template is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .qwen_vl import QwenVLFamily, QwenVLTemplate


def _thinks(source: str) -> bool:
    """A Thinking release: by its name, or (a local directory) a chat template that writes `<think>`."""
    if "thinking" in Path(str(source)).name.lower():
        return True
    d = Path(str(source))
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        f = d / name
        if f.is_file():
            try:
                text = f.read_text(encoding="utf-8")
                if name.endswith(".json"):
                    text = str(json.loads(text).get("chat_template") or "")
            except (OSError, ValueError):
                continue
            if "<think>" in text:
                return True
    return False


@dataclass(frozen=True)
class Qwen3VLFamily(QwenVLFamily):
    def template_for(self, source: str, config: dict) -> str | None:
        found = super().template_for(source, config)
        if found and _thinks(source):
            from ..errors import UserError

            raise UserError(f"{source}: a Qwen3-VL Thinking release; qilin-lite speaks the Instruct releases' template "
                            "only (the Thinking one opens every answer with <think>), so it would train and prompt "
                            "this model wrongly: use a Qwen3-VL-*-Instruct model")
        return found

QWEN3_VL_TEMPLATE = QwenVLTemplate(name="qwen3-vl", system="", multi_image="separate", max_images=16,
                                   stop=("<|im_end|>",))

QWEN3_VL = Qwen3VLFamily(
    name="qwen3-vl",
    templates=(QWEN3_VL_TEMPLATE,),
    model_class="Qwen3VLForConditionalGeneration",
    model_types=("qwen3_vl",),
    image_mode="native",
    image_marks="mm_token_type_ids",  # Qwen3VLModel.get_rope_index reads the image spans from these
    align_template="qwen3-vl",  # no captioning format: stage 1 trains the merger on captions as replies
    vision="model.visual",
    projector="model.visual.merger",  # qwen-vl-finetune's tune_mm_mlp; the deepstack_merger_list stays frozen
    llm="model.language_model",
    # qwen-vl-finetune's LoRA: the LLM's attention projections only (the vision blocks' fused qkv never match)
    lora_targets=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
)
