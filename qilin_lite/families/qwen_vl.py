"""Qwen2.5-VL (Lingshu, HuatuoGPT-Vision-7B-Qwen2.5VL, MedVLThinker, ...): the native transformers class
`Qwen2_5_VLForConditionalGeneration`, images at native resolution. Template `qwen2-vl`.

As the model's processor prompts it (its chat template) and as QwenLM's own fine-tuning code
(`qwen-vl-finetune/qwenvl/data/data_processor.py`) trains it:
- a record's `<image>` tags become image parts where they stand, and the text between them is stripped (their
  `_build_messages`: `re.split` on the tag, `seg.strip()`, empty pieces dropped); an image part renders as
  `<|vision_start|><|image_pad|><|vision_end|>`, and the processor repeats `<|image_pad|>` once per merged patch
  (grid_t * grid_h * grid_w / merge_size**2: about 1,300 for a 1024 px X-ray, 4 for a 56 px crop);
- `<|im_start|>role\\n...<|im_end|>\\n` per message, the default system prompt "You are a helpful assistant." when
  the first message is not a system message;
- supervised: each reply after `<|im_start|>assistant\\n`, its `<|im_end|>` and the `\\n` after it (their labels run
  from two tokens after `assistant` to one past `<|im_end|>`). Their scan keys on the id of the word `assistant`
  anywhere, so a user turn holding that word as one token would open a span in theirs: here spans come from the
  message structure, which equals theirs on every conversation where the word is only the role.
Typed text stays text: what a person or a record writes is tokenized with special tokens split, so a typed
`<|vision_start|>` or `<|image_pad|>` is characters, never an image slot (a typed `<image>` is removed by the generic
rule, since the program places images itself).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from .base import GGUF_MARK, IMAGE_TOKEN, Family, Rendered, Template, fit_gguf

QWEN_VL_SYSTEM = "You are a helpful assistant."
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
PAD = "<|image_pad|>"


def _parts(text: str) -> str:
    """A user turn as qwen-vl-finetune builds its content: image tags kept where they are, the text pieces between
    them stripped, empty pieces dropped."""
    pieces = re.split(f"({re.escape(IMAGE_TOKEN)})", text)
    return "".join(p if p == IMAGE_TOKEN else p.strip() for p in pieces)


@dataclass(frozen=True)
class QwenVLTemplate(Template):
    image_text: ClassVar[str] = VISION
    # Ollama runs Qwen2.5-VL on its own engine from safetensors, not from a GGUF pair with a Modelfile template
    exports_ollama: ClassVar[bool] = False

    def gguf_chat_template(self) -> str:
        """llama.cpp's Jinja over messages whose images are markers in the text (mtmd puts `<|vision_start|>` and
        `<|vision_end|>` around each itself): each marker stays where it stands and the text pieces between are
        stripped, as training's `<image>` parts are."""
        sys = self.system.replace("'", "\\'")
        default = ("{% if loop.first and x['role'] != 'system' %}{{ '<|im_start|>system\\n" + sys
                   + "<|im_end|>\\n' }}{% endif %}") if sys else ""
        t = (
            "{% for x in messages %}" + default +
            "{% set c = x['content'] if x['content'] is string else x['content'] | map(attribute='text') | join('') %}"
            + GGUF_MARK +
            "{{ '<|im_start|>' + x['role'] + '\\n' }}{% if x['role'] == 'user' %}"
            "{% for p in c.split(mk) %}{% if not loop.first %}{{ mk }}{% endif %}{{ p.strip() }}{% endfor %}"
            "{% else %}{{ c }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        )
        return fit_gguf(t, self.name)

    def ollama(self):
        from ..errors import UserError

        raise UserError(f"export gguf does not write an Ollama Modelfile for {self.name} models: Ollama runs "
                        "Qwen2.5-VL on its own engine; `ollama create` from a `qilin-lite merge` directory")

    def place_images(self, messages: list[dict]) -> list[dict]:
        return [{**m, "content": _parts(m["content"])} if m["role"] == "user" else m for m in messages]

    def batch_tokenizable(self, tokenizer) -> bool:
        return False  # special tokens are told from typed text by position (Rendered.specials), piece by piece

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False, eos: str = "") -> Rendered:
        r = Rendered("")
        special = r.special

        def header(role: str) -> None:
            special("<|im_start|>")
            r.text += role + "\n"

        if messages and messages[0]["role"] != "system" and self.system:
            header("system")
            r.text += self.system
            special("<|im_end|>")
            r.text += "\n"
        for m in messages:
            header(m["role"])
            if m["role"] == "assistant":
                start = len(r.text)
                r.text += m["content"]
                special("<|im_end|>")
                r.text += "\n"
                r.supervised.append((start, len(r.text)))
                continue
            for k, piece in enumerate(m["content"].split(IMAGE_TOKEN)):
                if k:
                    for tok in ("<|vision_start|>", PAD, "<|vision_end|>"):
                        special(tok)
                r.text += piece
            special("<|im_end|>")
            r.text += "\n"
        if add_generation_prompt:
            header("assistant")
        return r

    def chat_template_jinja(self) -> str:
        """The processor's chat template renders these prompts; this one also takes string content with `<image>`
        tags (records' and chat's form), placing each where it stands, the text between stripped as in training."""
        sys = self.system.replace("'", "\\'")
        return (
            "{% for message in messages %}{% if loop.first and message['role'] != 'system' and '" + sys + "' %}"
            "<|im_start|>system\n" + self.system + "<|im_end|>\n{% endif %}"
            "<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{% if message['role'] == 'user' %}"
            "{% set parts = message['content'].split('<image>') %}{% for p in parts %}"
            "{% if not loop.first %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}{{ p | trim }}{% endfor %}"
            "{% else %}{{ message['content'] }}{% endif %}"
            "{% else %}{% for content in message['content'] %}"
            "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
            "<|vision_start|><|image_pad|><|vision_end|>"
            "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )


QWEN2_VL = QwenVLTemplate(name="qwen2-vl", system=QWEN_VL_SYSTEM, multi_image="separate", max_images=16,
                          stop=("<|im_end|>",))


@dataclass(frozen=True)
class QwenVLFamily(Family):
    def template_for(self, source: str, config: dict) -> str | None:
        return self.templates[0].name if config.get("model_type") in self.model_types else None


QWEN2_5_VL = QwenVLFamily(
    name="qwen2.5-vl",
    templates=(QWEN2_VL,),
    model_class="Qwen2_5_VLForConditionalGeneration",
    model_types=("qwen2_5_vl",),
    image_mode="native",
    image_marks="mm_token_type_ids",
    align_template="qwen2-vl",  # no captioning format: stage 1 trains the merger on captions as replies
    vision="model.visual",
    projector="model.visual.merger",  # the patch merger: Qwen's vision -> LLM connector
    llm="model.language_model",
    # qwen-vl-finetune's LoRA: the LLM's attention projections only (the vision blocks' fused qkv never match)
    lora_targets=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
)
